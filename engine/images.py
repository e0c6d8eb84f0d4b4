"""Image files decoded to the picture an image viewer shows: the one decoder of the training data
(datasets.robust.load_rgb) and of pictures given to the models (models.pipeline.load_picture).

PIL's plain `convert("RGB")` gets three kinds of file wrong without any error: it ignores the EXIF
orientation (phone and camera photos come out sideways), clips 16-bit greyscale to 0..255 (nearly white)
and truncates float images to 0..255 (values in [0, 1] become black). This module sits on the bottom floor
(PIL and numpy only), so the models layer can use it without importing the datasets.
"""
from __future__ import annotations

import io
import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

Source = str | os.PathLike | bytes | IO[bytes] | Image.Image

# Integer modes wider than 8 bits, by the largest value of their type: scaled to 0..255 by that range.
_WIDE_INT_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def decode_rgb(source: Source) -> Image.Image:
    """A path, the file's bytes, an open binary file or a PIL image -> a fully decoded 8-bit RGB image as a
    viewer shows it: EXIF orientation applied, 16-bit and float pixels mapped from their real range,
    transparent parts over white. Raises (PIL's OSError/UnidentifiedImageError, ...) on a corrupt or
    truncated file, here rather than at first use."""
    if isinstance(source, Image.Image):
        source.load()
        return _viewed(source)
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(fp) as img:
        img.load()  # decode now, inside the caller's try, so truncation raises here and not later
        return _viewed(img)


def _viewed(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)  # a copy, turned as the EXIF Orientation tag says
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels often hold black; show them over white as a viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Single-channel images deeper than 8 bits -> mode L by their real range: 16-bit by 0..65535; 32-bit
    integers (PIL's "I", which 16-bit files also decode to) by 0..65535 when they lie in it, else from
    their minimum to their maximum; floats by [0, 1] when they lie in it (the convention of float TIFFs),
    else from their minimum to their maximum. Other modes are left to PIL."""
    if img.mode in _WIDE_INT_MAX:
        return _grey(np.asarray(img).astype(np.float64) / _WIDE_INT_MAX[img.mode])
    if img.mode == "I":
        x = np.asarray(img).astype(np.float64)
        return _grey(x / 65535 if x.size and x.min() >= 0 and x.max() <= 65535 else _stretch(x))
    if img.mode == "F":
        x = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return _grey(x if x.size and x.min() >= 0 and x.max() <= 1 else _stretch(x))
    return img


def _stretch(x: np.ndarray) -> np.ndarray:
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _grey(unit: np.ndarray) -> Image.Image:
    """Values in [0, 1] -> an 8-bit greyscale image, rounded to the nearest level."""
    return Image.fromarray(np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
