"""Read a Shapes-world image's attributes back from its pixels: the judge of prompt fidelity.

For a generated image it answers: which colour, shape, size and grid cell does the object have? It works
on the object's *coverage* α (0 = white background, 1 = the fill colour), which anti-aliasing and
decoder blur make fractional at the edges:

- colour: the palette colour nearest to the object's core (the most covered pixels);
- coverage: each pixel projected onto the segment from white to that colour;
- size: the larger of the two extents, each the sum over columns (rows) of the column's (row's) highest
  coverage, i.e. the bounding box measured to sub-pixel precision; small below 22 px (14-18 vs 26-30);
- position: the centre of those extents (the bounding-box centre: the spec's object centre), nearest grid
  point per axis; a triangle's area centroid would sit 1/6 of its height low, hence not the centroid;
- shape: fill = area / (extent_x * extent_y): square 1, circle pi/4, triangle and diamond 1/2; the last two
  differ in where they are wide: a triangle at the bottom, a diamond in the middle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from datasets.shapes import COLORS, COLS, GRID, ROWS, SHAPES, SIZES

PALETTE = np.array([rgb for _, rgb in COLORS], dtype=np.float64)  # (8, 3)
SIZE_THRESHOLD = 22.0


@dataclass(frozen=True)
class Judgement:
    found: bool
    color: int = -1
    shape: int = -1
    size: int = -1
    row: int = -1
    col: int = -1

    def labels(self) -> dict[str, int]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "row": self.row, "col": self.col}

    def describe(self) -> str:
        if not self.found:
            return "no object"
        shape = SHAPES[self.shape] if self.shape >= 0 else "shapeless object"
        return f"{SIZES[self.size]} {COLORS[self.color][0]} {shape}, {ROWS[self.row]} {COLS[self.col]}"


def _as_array(image) -> np.ndarray:
    """PIL image, uint8 HxWx3 array, or float tensor (3, H, W) in [-1, 1] -> float64 (H, W, 3) in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # torch tensor in the VQGAN's range
        arr = image.detach().float().clamp(-1, 1).add(1).mul(127.5).permute(1, 2, 0).cpu().numpy()
        return arr.astype(np.float64)
    return np.asarray(image, dtype=np.float64)


def judge(image) -> Judgement:
    px = _as_array(image)                                        # (H, W, 3)
    ink = (255.0 - px).max(axis=2)                               # distance from white, per pixel
    if ink.max() < 60:
        return Judgement(found=False)
    core = px[ink >= np.percentile(ink[ink > 30], 75)] if (ink > 30).sum() >= 4 else px[ink >= ink.max() * 0.9]
    colour = int(np.argmin(((PALETTE - np.median(core, axis=0)) ** 2).sum(1)))
    direction = 255.0 - PALETTE[colour]                          # white -> colour, in "ink" space
    alpha = ((255.0 - px) @ direction) / (direction @ direction)  # (H, W) coverage
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[alpha < 0.1] = 0.0                                     # decoder haze is not object
    col_profile, row_profile = alpha.max(axis=0), alpha.max(axis=1)  # (W,), (H,)
    ext_x, ext_y = col_profile.sum(), row_profile.sum()
    if ext_x < 3 or ext_y < 3:
        return Judgement(found=False)
    cx = (col_profile * (np.arange(len(col_profile)) + 0.5)).sum() / ext_x
    cy = (row_profile * (np.arange(len(row_profile)) + 0.5)).sum() / ext_y
    size = int(max(ext_x, ext_y) >= SIZE_THRESHOLD)
    col = int(np.argmin([abs(cx - g) for g in GRID]))
    row = int(np.argmin([abs(cy - g) for g in GRID]))
    fill = alpha.sum() / (ext_x * ext_y)
    if fill > 0.89:
        shape = SHAPES.index("square")
    elif fill > 0.64:
        shape = SHAPES.index("circle")
    else:
        # Row widths (coverage per row) over the object's rows: a triangle widens downwards, a diamond
        # is widest in the middle.
        rows = np.nonzero(row_profile > 0.5)[0]
        widths = alpha[rows].sum(axis=1)
        n = len(widths)
        if n < 4:  # a sliver a few pixels high: no shape of the world's four
            return Judgement(True, colour, -1, size, row, col)
        top, mid, bottom = widths[: n // 4].mean(), widths[3 * n // 8: 5 * n // 8 + 1].mean(), widths[-(n // 4):].mean()
        shape = SHAPES.index("triangle") if bottom > max(top, mid) * 1.15 else SHAPES.index("diamond")
    return Judgement(True, colour, shape, size, row, col)
