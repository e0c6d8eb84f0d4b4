"""What every file-backed dataset shares: the error type, image decoding, and skipping unreadable images.

A large image collection always holds a few broken files. Crashing a multi-day run on one of them is
worse than skipping it, but skipping silently hides real problems, so an unreadable image is reported
once (naming it), replaced by the next readable item, and counted in the item's `skipped` field so the
trainer can sum the count across DataLoader workers and log it.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from datasets.transforms import unpack_key
from engine.errors import DataError  # the engine's, which its loaders raise too; datasets' own
from engine.images import decode_rgb

# Truncated files must raise instead of decoding to a half-grey image that would silently enter training.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# How many consecutive items may fail before giving up: enough to ride over a run of broken files,
# few enough that a wrong path or a wholesale-corrupt collection fails fast.
MAX_ATTEMPTS = 100

Transform = Callable[[Image.Image, int], torch.Tensor]


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped."""


_warned_sources: set[str] = set()


def warn_unreadable(source: str, error: BaseException) -> None:
    """Warn once per process per source, so a broken file re-read every epoch does not flood the log."""
    if source in _warned_sources:
        return
    _warned_sources.add(source)
    warnings.warn(f"skipping unreadable image {source}: {one_line(error)}", CorruptImageWarning, stacklevel=3)


def one_line(error: BaseException | None) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_rgb(source: str | os.PathLike | bytes) -> Image.Image:
    """Fully decode an image file (a path, or the file's bytes) to RGB as a viewer shows it (EXIF orientation,
    16-bit and float pixels by their real range: engine.images.decode_rgb); raises on any corrupt or
    truncated file."""
    return decode_rgb(source)


def encode_names(names: Sequence[str]) -> np.ndarray:
    """Store many paths/keys as one numpy bytes array: DataLoader workers forked from the parent then share
    it, whereas a Python list of str is slowly copied into every worker by reference counting."""
    return np.array([os.fsencode(n) for n in names], dtype=np.bytes_)


def decode_name(names: np.ndarray, i: int) -> str:
    return os.fsdecode(names[i])


class RobustImageDataset(Dataset):
    """Base for datasets whose items are records read from storage.

    Subclasses set `self.root` (for messages) and implement `num_records()`, `describe(record)` (a name
    for warnings) and `read(record) -> (PIL image, extra fields)`, raising on any unreadable record.
    Dataset index i maps to record `self.records[i]`, so `subset` can carve train/val splits that never
    borrow each other's items, even when skipping a broken file.
    """

    root: str

    def __init__(self, transform: Transform):
        self.transform = transform
        self.records = np.arange(self.num_records(), dtype=np.int64)  # (N,) dataset index -> record id

    def num_records(self) -> int:
        raise NotImplementedError

    def describe(self, record: int) -> str:
        raise NotImplementedError

    def read(self, record: int) -> tuple[Image.Image, dict[str, Any]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int], transform: Transform | None = None) -> RobustImageDataset:
        """A view holding only `indices` of this dataset (renumbered from 0), optionally with another transform."""
        view = copy.copy(self)
        view.records = self.records[np.asarray(indices, dtype=np.int64)]
        view.transform = transform or self.transform
        return view

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = unpack_key(key)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        if seed is None:
            seed = index
        attempts = min(MAX_ATTEMPTS, n)
        last_error: BaseException | None = None
        for skipped in range(attempts):
            i = (index + skipped) % n
            record = int(self.records[i])
            try:
                image, extras = self.read(record)
            except Exception as error:  # any decoder failure means "unreadable", whatever its type
                warn_unreadable(self.describe(record), error)
                last_error = error
                continue
            # The transform runs outside the try: a bug there must raise, not be mistaken for a bad file.
            return {"image": self.transform(image, seed), "index": i, "skipped": skipped, **extras}
        # The data's fault, not a bug: one line for the user (a DataError, not a traceback).
        raise DataError(f"{attempts} consecutive unreadable images from index {index} of {n} in {self.root} "
                        f"(last error: {one_line(last_error)}); is the data corrupt?")
