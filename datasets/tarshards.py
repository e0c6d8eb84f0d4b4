"""Webdataset-format tar shards read as a map-style dataset.

A shard groups members into samples by key (the member path up to the first dot of its file name):
"00012.jpg" and "00012.txt" are one sample with an image and a caption. Instead of streaming, each shard
is indexed once at construction (tar headers only), and items are read by seeking to their byte offset.
Indexing by position is what lets samplers, exact resume and distributed splitting work as on any
other dataset.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Any

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from datasets.robust import (DataError, RobustImageDataset, Transform, decode_name, encode_names, load_rgb,
                             one_line)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample with several images uses the first listed
CAPTION_EXTENSION = "txt"
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # the same split as webdataset's


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """Shard paths for a directory (its *.tar files), a glob ("data/*.tar") or brace notation
    ("shards-{000000..000009}.tar"); sorted within each pattern, and every path must exist."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not paths:
            raise DataError(f"no .tar shards in directory {spec}")
        return paths
    paths = []
    for pattern in braceexpand(spec):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"no shards match {pattern}")
            paths += matches
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise DataError(f"shard {pattern} not found (from {spec})")
    return paths


def index_shard(path: str) -> dict[str, dict[str, tarfile.TarInfo]]:
    """key -> {extension (lower case) -> member} for every regular file in one uncompressed shard."""
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": offsets must be byte positions in the file
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot index shard {path} (expected an uncompressed .tar): {one_line(error)}") from None
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        match = _KEY_AND_EXTENSION.match(member.name)
        if member.isfile() and match:
            samples.setdefault(match.group(1), {})[match.group(2).lower()] = member
    return samples


class TarShards(RobustImageDataset):
    """Samples with an image in the shards given by `shards` (see expand_shards), in shard then tar order.

    If any sample has a .txt member, every item carries `caption` ("" for samples without one).
    """

    def __init__(self, shards: str | os.PathLike, transform: Transform):
        self.root = os.fspath(shards)
        self.shard_paths = expand_shards(self.root)
        keys, rows = [], []  # rows: (shard, image offset, image size, caption offset, caption size)
        for shard, path in enumerate(self.shard_paths):
            for key, members in index_shard(path).items():
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    continue
                text = members.get(CAPTION_EXTENSION)
                keys.append(key)
                rows.append((shard, image.offset_data, image.size,
                             text.offset_data if text else -1, text.size if text else 0))
        if not rows:
            raise DataError(f"no samples with a {'/'.join(IMAGE_EXTENSIONS)} image in the shards {self.root}")
        self.keys = encode_names(keys)  # (num_samples,) bytes
        self.locations = np.array(rows, dtype=np.int64)  # (num_samples, 5)
        self.captioned = bool((self.locations[:, 3] >= 0).any())
        super().__init__(transform)

    def num_records(self) -> int:
        return len(self.locations)

    def describe(self, record: int) -> str:
        return f"{self.shard_paths[self.locations[record, 0]]}:{decode_name(self.keys, record)}"

    def _read_bytes(self, shard: int, offset: int, size: int) -> bytes:
        with open(self.shard_paths[shard], "rb") as f:  # a fresh handle: safe in forked workers
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"shard ends after {len(data)} of {size} bytes")
        return data

    def read(self, record: int) -> tuple[Image.Image, dict[str, Any]]:
        shard, image_offset, image_size, text_offset, text_size = (int(v) for v in self.locations[record])
        image = load_rgb(self._read_bytes(shard, image_offset, image_size))
        if not self.captioned:
            return image, {}
        caption = ""
        if text_offset >= 0:
            caption = self._read_bytes(shard, text_offset, text_size).decode("utf-8").strip()
        return image, {"caption": caption}
