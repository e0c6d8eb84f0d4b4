"""Pre-encoded shards: each image's VQGAN token grid and CLIP embedding(s), computed once.

GPT training then spends no time in the frozen networks. A folder holds `shard-NNNNN.safetensors` files
and a `meta.json` written last. Shard k covers dataset items [k*S, (k+1)*S); ranks encode disjoint shards
in parallel (k = rank, rank + W, ...), each shard is written to a temporary file and renamed, and a shard
that exists is not encoded again (an interrupted run continues). A reader opens only a folder whose
meta.json lists every shard, so it never sees a half-written one.

Tensors per shard (N items): tokens (N, h, w) int16/int32, image_embed (N, D) float16 (L2-normalised),
index (N,) int64, and where the source has captions text_embed (N, D) float16 (for --cond text).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from datasets.robust import DataError
from engine.checkpoint import atomic_write
from datasets.transforms import unpack_key

META = "meta.json"
FORMAT = "clipgen-encoded-v1"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def n_shards(n_items: int, shard_size: int) -> int:
    return (n_items + shard_size - 1) // shard_size


def write_shard(folder: Path, k: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Atomically write shard k (engine.checkpoint.atomic_write: a temporary file beside it, then a rename)."""
    atomic_write(folder / shard_name(k), lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()},
                                                              tmp, metadata={"info": json.dumps(info)}))


def write_meta(folder: Path, meta: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, **meta}, f, indent=1)

    atomic_write(folder / META, write)


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise DataError(f"{folder} holds no complete pre-encoded set ({META} missing): run preencode.py "
                        "to the end first")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} folder")
    return meta


class EncodedShards(Dataset):
    """All shards of a folder, held in memory (tokens are small: 64 int16 per Shapes image).

    Items: {"tokens": (h, w) long, "image_embed": (D,) float32, "index": int, ["text_embed": (D,)]}.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        parts = []
        for k in range(self.meta["n_shards"]):
            path = self.folder / shard_name(k)
            if not path.is_file():
                raise DataError(f"{path} is missing although {META} lists it; re-run preencode.py")
            parts.append(load_file(path))
        self.tensors = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        if len(self.tensors["index"]) != self.meta["n_items"]:
            raise DataError(f"{self.folder}: shards hold {len(self.tensors['index'])} items, "
                            f"{META} says {self.meta['n_items']}")

    @property
    def has_text(self) -> bool:
        return "text_embed" in self.tensors

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, key) -> dict:
        i, _ = unpack_key(key)  # no augmentation: the seed is not needed
        item = {"tokens": self.tensors["tokens"][i].long(), "image_embed": self.tensors["image_embed"][i].float(),
                "index": int(self.tensors["index"][i])}
        if self.has_text:
            item["text_embed"] = self.tensors["text_embed"][i].float()
        return item
