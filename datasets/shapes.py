"""The Shapes world (specs/shapes-world.md, version 1): one coloured shape on white, with exact labels.

Every image is a pure function of (split seed, index): the world needs no disk, and the same index always
gives the same pixels, attributes and caption. Attributes are drawn independently and uniformly:
8 colours x 4 shapes x 2 sizes x 9 grid cells = 576 combinations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from datasets.robust import DataError
from datasets.transforms import EvalTransform, unpack_key

CANVAS = 64  # px, square
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: 16 samples per pixel of anti-aliasing
BACKGROUND = (255, 255, 255)

COLORS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)),
    ("orange", (245, 140, 20)),
    ("yellow", (235, 205, 30)),
    ("green", (40, 160, 60)),
    ("cyan", (30, 190, 210)),
    ("blue", (40, 70, 220)),
    ("purple", (140, 60, 190)),
    ("black", (30, 30, 30)),
]
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = ["small", "large"]
SIZE_RANGES = [(14.0, 18.0), (26.0, 30.0)]  # side of the bounding box in px, per entry of SIZES
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
GRID = [16.0, 32.0, 48.0]  # centre coordinate in px of row/col 0, 1, 2
JITTER = 3.0  # px, uniform +- around the grid point
MARGIN = 1.0  # px kept free between the bounding box and the canvas edge

POSITION_PHRASES = {
    ("top", "left"): "in the top left",
    ("top", "center"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "center"): "in the center",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}

# Distinct seeds give independent streams, so the captioned splits (CLIP's training data) share no
# images with the unlabeled splits that VQGAN and GPT learn from.
SPLIT_SEEDS = {
    "unlabeled-train": 1_000,
    "unlabeled-val": 1_001,
    "captioned-train": 2_000,
    "captioned-val": 2_001,
    "test": 3_000,
}

# "{a}" is the article for the description that follows ("a" or "an"); "{desc}" is e.g. "small red circle
# in the top left".
TEMPLATES = [
    "{a} {desc}",
    "a photo of {a} {desc}",
    "an image of {a} {desc}",
    "a drawing of {a} {desc}",
    "a picture of {a} {desc}",
    "there is {a} {desc}",
]
ATTRIBUTES = ("color", "shape", "size", "position")


@dataclass(frozen=True)
class ShapeSpec:
    """One object: attribute indices into COLORS/SHAPES/SIZES/ROWS/COLS, and its exact geometry in px.

    The bounding box is side x side centred at (cx, cy), in continuous coordinates where pixel (x, y)
    covers [x, x+1) x [y, y+1).
    """

    color: int
    shape: int
    size: int
    row: int
    col: int
    side: float
    cx: float
    cy: float

    def labels(self) -> dict[str, int]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "row": self.row, "col": self.col}

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box."""
        h = self.side / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


def _clamp_centre(grid_value: float, jitter: float, side: float) -> float:
    half = side / 2
    return min(max(grid_value + jitter, MARGIN + half), CANVAS - MARGIN - half)


def sample_attributes(split_seed: int, index: int) -> ShapeSpec:
    """The object of item `index` of the split with seed `split_seed`; a pure function of both."""
    rng = np.random.default_rng([split_seed, index])
    color = int(rng.integers(len(COLORS)))
    shape = int(rng.integers(len(SHAPES)))
    size = int(rng.integers(len(SIZES)))
    row = int(rng.integers(len(ROWS)))
    col = int(rng.integers(len(COLS)))
    side = float(rng.uniform(*SIZE_RANGES[size]))
    jitter_x, jitter_y = (float(j) for j in rng.uniform(-JITTER, JITTER, size=2))
    cx = _clamp_centre(GRID[col], jitter_x, side)
    cy = _clamp_centre(GRID[row], jitter_y, side)
    return ShapeSpec(color, shape, size, row, col, side, cx, cy)


def render(spec: ShapeSpec) -> Image.Image:
    """64 x 64 RGB image of `spec`: white background, one object filled with the exact palette colour."""
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw_object(image, spec.color, spec.shape, spec.box())
    return image


def draw_object(canvas: Image.Image, color: int, shape: int, box: tuple[float, float, float, float]) -> None:
    """Draw one object (COLORS[color], SHAPES[shape]) filling `box` = (x0, y0, x1, y1) onto `canvas` (RGB,
    white under the box) in place; the Shapes world and the scenes world (datasets/scenes.py) both draw
    with it. The box must lie inside the canvas.

    Only the pixels under the bounding box can differ from white, so just that patch is drawn at 4x
    and pasted (about twice as fast as drawing the whole 256 x 256 canvas; the two differ by at most a
    sub-pixel at a polygon vertex). The pasted patch covers the box's whole-pixel hull, white where the
    object is not: objects whose hulls overlap would erase each other (scenes keep 2 px between boxes, so
    hulls never overlap). The patch is shrunk by `Image.reduce`, the exact mean of each 4 x 4
    block, i.e. a BOX filter: it has no negative lobes, so there is no ringing, edges blend only between
    the colour and white, and every pixel the object covers fully keeps exactly the palette RGB (which
    the fidelity metric reads). `resize(..., BOX)` would be the same filter but rounds to 8 bits between
    its horizontal and vertical passes, which puts edge pixels up to 1 level off the true mean.
    """
    x0, y0, x1, y1 = box
    left, top = math.floor(x0), math.floor(y0)
    right, bottom = math.ceil(x1), math.ceil(y1)
    s = SUPERSAMPLE
    patch = Image.new("RGB", ((right - left) * s, (bottom - top) * s), BACKGROUND)

    # Box corners in patch sub-pixels. PIL fills every sub-pixel from floor(start) to floor(end)
    # inclusive, so the box shrinks by half a sub-pixel per side: this makes the drawn area and
    # centroid unbiased (measured within 0.6% and 0.02 sub-pixel over random boxes for all four shapes).
    px0, py0 = (x0 - left) * s + 0.5, (y0 - top) * s + 0.5
    px1, py1 = (x1 - left) * s - 0.5, (y1 - top) * s - 0.5
    pcx, pcy = (px0 + px1) / 2, (py0 + py1) / 2
    fill = COLORS[color][1]
    draw = ImageDraw.Draw(patch)
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([px0, py0, px1, py1], fill=fill)
    elif name == "square":
        draw.polygon([(px0, py0), (px1, py0), (px1, py1), (px0, py1)], fill=fill)
    elif name == "triangle":  # apex at the top centre, base along the bottom edge
        draw.polygon([(pcx, py0), (px1, py1), (px0, py1)], fill=fill)
    else:  # diamond: corners at the midpoints of the box's top, right, bottom and left edges
        draw.polygon([(pcx, py0), (px1, pcy), (pcx, py1), (px0, pcy)], fill=fill)
    canvas.paste(patch.reduce(s), (left, top))


def _article(word: str) -> str:
    # Every word of this vocabulary that starts with a vowel letter also starts with a vowel sound.
    return "an" if word[0] in "aeiou" else "a"


def describe(spec: ShapeSpec, named: Collection[str] = ATTRIBUTES, template: int = 0) -> str:
    """A caption that names exactly the attributes in `named` (a subset of ATTRIBUTES), worded with
    TEMPLATES[template]. An unnamed shape is called "shape": describe(s, {"color"}) -> "a red shape"."""
    unknown = set(named) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; choose from {list(ATTRIBUTES)}")
    words = []
    if "size" in named:
        words.append(SIZES[spec.size])
    if "color" in named:
        words.append(COLORS[spec.color][0])
    words.append(SHAPES[spec.shape] if "shape" in named else "shape")
    if "position" in named:
        words.append(POSITION_PHRASES[ROWS[spec.row], COLS[spec.col]])
    return TEMPLATES[template].format(a=_article(words[0]), desc=" ".join(words))


# How often a caption names size / position (the spec: 0.5 or more). Position is named in most captions:
# every caption that leaves it out asks CLIP to match the same text at all nine cells. At 0.5 the small
# CLIP ignored position altogether (zero-shot at chance, identical text embeddings for "... in the top
# left" and "... in the bottom right"); 0.8 together with CLIP pixels that map white to 0 (so background
# patches carry only their position embedding; models/clip.py) gets it to >= 99%; either alone does not.
P_SIZE, P_POSITION = 0.5, 0.8


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A training caption: colour and shape always, size and position with probability P_SIZE, P_POSITION."""
    template = int(rng.integers(len(TEMPLATES)))
    named = {"color", "shape"}
    if rng.random() < P_SIZE:
        named.add("size")
    if rng.random() < P_POSITION:
        named.add("position")
    return describe(spec, named, template)


class SyntheticSplit(Dataset):
    """One split of a synthetic world (WORLD names it in errors; SPLIT_SEEDS maps split names to seeds):
    `length` items, images resized to `resolution`, captions on captioned splits (or as `captioned` says)."""

    WORLD = "Shapes"
    SPLIT_SEEDS = SPLIT_SEEDS

    def __init__(self, split: str = "unlabeled-train", length: int = 50_000, resolution: int = CANVAS,
                 captioned: bool | None = None):
        if split not in self.SPLIT_SEEDS:
            raise DataError(f"unknown {self.WORLD} split {split!r}; expected one of {list(self.SPLIT_SEEDS)}")
        if length < 1:
            raise DataError(f"a {self.WORLD} split needs at least 1 item, got length={length}")
        self.split = split
        self.split_seed = self.SPLIT_SEEDS[split]
        self.length = length
        self.resolution = resolution
        self.captioned = split.startswith("captioned") if captioned is None else captioned
        self.transform = EvalTransform(resolution)

    def __len__(self) -> int:
        return self.length


class ShapesDataset(SyntheticSplit):
    """`length` items of one split. Items carry the labels (color, shape, size, row, col) and, for
    captioned splits, a caption. Resolutions other than 64 resize the whole image (no crop: position is
    a label). Items are fixed by (split, index); the seed of an (index, seed) key is not used."""


    def spec(self, index: int) -> ShapeSpec:
        return sample_attributes(self.split_seed, index)

    def caption(self, index: int, spec: ShapeSpec | None = None) -> str:
        # Its own stream (a third seed word), so captions do not shift if attribute sampling changes.
        rng = np.random.default_rng([self.split_seed, index, 1])
        return caption(spec or self.spec(index), rng)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = unpack_key(key)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a Shapes split of {self.length} items")
        spec = self.spec(index)
        item = {"image": self.transform(render(spec)), "index": index, "skipped": 0, **spec.labels()}
        if self.captioned:
            item["caption"] = self.caption(index, spec)
        return item
