"""COCO-style captioned images: a captions_*.json annotation file plus the folder its file names live in.

One item per image (not per caption), so an epoch sees each image once. The item's `caption` is the
image's first caption (lowest annotation id, the same on every run); `captions(i)` gives all of them,
e.g. to use as evaluation prompts.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

from PIL import Image

from datasets.robust import (DataError, RobustImageDataset, Transform, decode_name, encode_names, load_rgb,
                             one_line)


def _load_annotations(path: str):
    from pycocotools.coco import COCO  # imported here: only COCO users need pycocotools

    if not os.path.isfile(path):
        raise DataError(f"COCO annotation file {path} not found (expected a captions_*.json)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(path)
    except Exception as error:
        raise DataError(f"cannot read COCO annotations {path}: {one_line(error)}") from None


class CocoCaptions(RobustImageDataset):
    """Images listed in `annotation_file` that have at least one caption, sorted by image id."""

    def __init__(self, image_root: str | os.PathLike, annotation_file: str | os.PathLike, transform: Transform):
        self.root = os.fspath(image_root)
        self.annotation_file = os.fspath(annotation_file)
        if not os.path.isdir(self.root):
            raise DataError(f"COCO image folder {self.root} does not exist or is not a directory")
        coco = _load_annotations(self.annotation_file)
        file_names, all_captions = [], []
        for image_id in sorted(coco.getImgIds()):
            annotations = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
            captions = [a["caption"].strip() for a in annotations if "caption" in a]
            if captions:
                file_names.append(coco.loadImgs([image_id])[0]["file_name"])
                all_captions.append(captions)
        if not file_names:
            raise DataError(f"no captioned images in {self.annotation_file}; expected a captions_*.json "
                            f"with 'images' and 'annotations' that have a 'caption'")
        # Catch a wrong --data-path at start-up, not as 100 "unreadable" images in the first batch.
        first = os.path.join(self.root, file_names[0])
        if not os.path.isfile(first):
            raise DataError(f"{first} not found: is {self.root} the image folder for {self.annotation_file}?")
        self.file_names = encode_names(file_names)  # (num_images,) bytes
        self.all_captions = all_captions  # num_images lists of str
        super().__init__(transform)

    def num_records(self) -> int:
        return len(self.file_names)

    def captions(self, index: int) -> list[str]:
        """All captions of item `index`, in annotation-id order."""
        return list(self.all_captions[int(self.records[index])])

    def describe(self, record: int) -> str:
        return os.path.join(self.root, decode_name(self.file_names, record))

    def read(self, record: int) -> tuple[Image.Image, dict[str, Any]]:
        return load_rgb(self.describe(record)), {"caption": self.all_captions[record][0]}
