"""Image transforms and the dataset key convention.

A dataset key is an int index or a tuple (index, seed). The seed is the only source of randomness an
item may use: no global RNG is touched, so an item's pixels depend on (index, seed) alone, which makes
resumed training and any number of DataLoader workers reproduce the same batches.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from PIL import Image


def unpack_key(key) -> tuple[int, int | None]:
    """int index -> (index, None); (index, seed) -> (index, seed). Numpy and 0-d tensor ints are accepted."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an index or an (index, seed) pair, got {key!r}")
        return operator.index(key[0]), operator.index(key[1])
    return operator.index(key), None


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio. PIL's bicubic widens its kernel
    when shrinking, so downscaling is antialiased (no aliasing of fine texture)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new_w = size if w <= h else max(size, round(w * scale))
    new_h = size if h < w else max(size, round(h * scale))
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def ensure_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 (3, H, W) in [-1, 1]."""
    # In numpy: on small CPUs torch's strided uint8->float copy was measured ~100x slower for 256 x 256.
    pixels = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, H, W) in [0, 255]
    pixels /= 127.5
    pixels -= 1.0
    return torch.from_numpy(pixels)


class TrainTransform:
    """Resize the shorter side to R, then crop R x R at an offset drawn from the item's seed."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        img = resize_shorter_side(ensure_rgb(img), self.resolution)
        w, h = img.size
        # A private generator per item; numpy seeds must be non-negative, hence the wrap.
        rng = np.random.default_rng(seed % 2**64)
        left = int(rng.integers(0, w - self.resolution + 1))
        top = int(rng.integers(0, h - self.resolution + 1))
        return to_tensor(img.crop((left, top, left + self.resolution, top + self.resolution)))

    def __repr__(self) -> str:
        return f"TrainTransform(resolution={self.resolution})"


class EvalTransform:
    """Resize the shorter side to R, then take the centre R x R crop; the seed is ignored."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, img: Image.Image, seed: int | None = None) -> torch.Tensor:
        img = resize_shorter_side(ensure_rgb(img), self.resolution)
        w, h = img.size
        left = (w - self.resolution) // 2
        top = (h - self.resolution) // 2
        return to_tensor(img.crop((left, top, left + self.resolution, top + self.resolution)))

    def __repr__(self) -> str:
        return f"EvalTransform(resolution={self.resolution})"
