"""Every image under a directory tree, in sorted order so that index i is the same file on every run."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from datasets.robust import DataError, RobustImageDataset, Transform, decode_name, encode_names, load_rgb

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def find_images(root: str) -> list[str]:
    """Sorted paths of the image files under `root`, searched recursively; extensions match in any case.
    Hidden files and directories (".git", macOS "._x.jpg" companions) are not images and are left out."""
    paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        paths += [os.path.join(folder, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(paths)


class ImageFolder(RobustImageDataset):
    """Unlabelled images found recursively under `root`; items are {image, index, skipped}."""

    def __init__(self, root: str | os.PathLike, transform: Transform):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(f"image folder {self.root} does not exist or is not a directory")
        paths = find_images(self.root)
        if not paths:
            raise DataError(f"no images found under {self.root} "
                            f"(searched recursively for {' '.join(sorted(IMAGE_EXTENSIONS))})")
        self.paths = encode_names(paths)  # (num_files,) bytes
        super().__init__(transform)

    def num_records(self) -> int:
        return len(self.paths)

    def describe(self, record: int) -> str:
        return decode_name(self.paths, record)

    def read(self, record: int) -> tuple[Image.Image, dict[str, Any]]:
        return load_rgb(decode_name(self.paths, record)), {}
