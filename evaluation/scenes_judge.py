"""The scenes world's pixel judge (specs/shapes-scenes.md): the objects an image shows, and whether they
satisfy a prompt's category rule.

Objects are the connected non-white regions of at least MIN_PIXELS pixels:

- non-white: some channel at least INK_THRESHOLD levels below white (255). That is about 30% coverage of
  any palette colour (its darkest channel is 195-235 levels below white), so a rendered object's
  anti-aliased rim, whose outermost pixels are covered only a little, does not grow it, and the faint haze
  a decoder leaves on the background does not make objects;
- connected: 8-connectivity. Two objects are at least 2 px apart (the spec), so at least one whole pixel
  row or column of white separates their pixels and no diagonal step joins them; a thin diagonal part of
  one object (a triangle's apex, a diamond's tips, a decoder's slightly broken slanted edge) stays joined
  to it, where 4-connectivity would cut it off;
- each object is measured by the Shapes world's judge (evaluation/judge.py) on a crop of the image in which
  everything but the region, grown by one pixel to take in its faint rim, is white: its colour (the palette
  colour nearest its core pixels) and its shape (silhouette fill of the sub-pixel bounding box; triangle vs
  diamond by where the object is widest). Its centre is the centre of that sub-pixel bounding box (the
  spec's object centre; a triangle's area centroid would sit 1/6 of its height low).

The category rules (`right`) are the spec's table, word for word.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasets.scenes import GRID, RELATIONS
from evaluation.judge import PALETTE, _as_array, judge

INK_THRESHOLD = 64.0
MIN_PIXELS = 12
MIN_OFFSET = 5.0  # px: how much further in the named direction the first object's centre must be
CATEGORIES = ("single", "two_objects", "counting", "colour_attribution", "position")


@dataclass(frozen=True)
class Found:
    """One object read from the pixels: colour/shape index (shape -1: none of the four), box centre in px
    (pixel (x, y) covers [x, x+1) x [y, y+1)), and how many pixels its region has."""

    color: int
    shape: int
    cx: float
    cy: float
    pixels: int

    @property
    def kind(self) -> tuple[int, int]:
        return self.color, self.shape

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the nearest grid cell centre."""
        return (int(np.argmin([abs(self.cy - g) for g in GRID])),
                int(np.argmin([abs(self.cx - g) for g in GRID])))


def _neighbourhood_min(lab: np.ndarray, fill: int) -> np.ndarray:
    """Min over each pixel's 3 x 3 neighbourhood (8-connectivity) of lab (H, W)."""
    h, w = lab.shape
    p = np.pad(lab, 1, constant_values=fill)
    return np.minimum.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of mask (H, W) bool -> (labels (H, W) int, 0 = background, 1..K; K).

    Each pixel starts with its own number and takes the smallest in its neighbourhood until nothing changes
    (as many rounds as a region's longest path: a few dozen for the world's objects, all in numpy)."""
    h, w = mask.shape
    none = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), none)
    while True:
        nxt = np.where(mask, _neighbourhood_min(lab, none), none)
        if np.array_equal(nxt, lab):
            break
        lab = nxt
    ids, dense = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = dense + 1
    return out, len(ids)


def _box_centre(crop: np.ndarray, color: int) -> tuple[float, float]:
    """Centre (x, y) of the sub-pixel bounding box of the object of palette colour `color` in crop (h, w, 3),
    as evaluation/judge.py measures it: coverage projected on the white->colour segment, per column (row)
    its highest value, the centre of those profiles."""
    direction = 255.0 - PALETTE[color]
    alpha = np.clip(((255.0 - crop) @ direction) / (direction @ direction), 0.0, 1.0)  # (h, w)
    alpha[alpha < 0.1] = 0.0
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)
    cx = (cols * (np.arange(len(cols)) + 0.5)).sum() / max(cols.sum(), 1e-9)
    cy = (rows * (np.arange(len(rows)) + 0.5)).sum() / max(rows.sum(), 1e-9)
    return float(cx), float(cy)


def find_objects(image) -> list[Found]:
    """The objects of an image (PIL image, uint8 (H, W, 3) array, or a (3, H, W) tensor in [-1, 1]), in
    reading order (by the row of the nearest cell, then left to right)."""
    px = _as_array(image)                                      # (H, W, 3) in [0, 255]
    ink = (255.0 - px).max(axis=2)                             # (H, W) distance from white
    labels, k = label_regions(ink >= INK_THRESHOLD)
    found = []
    for i in range(1, k + 1):
        region = labels == i
        n = int(region.sum())
        if n < MIN_PIXELS:
            continue
        # The region grown by one pixel (its rim), minus other regions' pixels, on white; cropped 2 px wide.
        grown = (_neighbourhood_min(np.where(region, 0, 1), 1) == 0) & ((labels == 0) | region)
        ys, xs = np.nonzero(grown)
        y0, y1, x0, x1 = max(ys.min() - 2, 0), ys.max() + 3, max(xs.min() - 2, 0), xs.max() + 3
        crop = np.where(grown[y0:y1, x0:x1, None], px[y0:y1, x0:x1], 255.0)
        j = judge(crop)
        if not j.found:  # cannot happen for a region of >= 12 inked pixels; kept as a colourless object
            found.append(Found(-1, -1, float(xs.mean() + 0.5), float(ys.mean() + 0.5), n))
            continue
        cx, cy = _box_centre(crop, j.color)
        found.append(Found(j.color, j.shape, float(cx + x0), float(cy + y0), n))
    return sorted(found, key=lambda f: (f.cell[0], f.cx, f.cy))


# ------------------------------------------------------------------------------------ category rules

@dataclass(frozen=True)
class Query:
    """What a prompt asks, as the judge needs it.

    single:             kinds = [(color, shape)]
    two_objects:        kinds = [(None, shape_a), (None, shape_b)], shapes different, colours not named
    counting:           kinds = [(color, shape)], count = 2, 3 or 4
    colour_attribution: kinds = [(color_a, shape_a), (color_b, shape_b)], both colours and shapes different
    position:           kinds = [first, second] (color, shape) pairs, relation one of RELATIONS
    """

    category: str
    kinds: tuple
    count: int = 1
    relation: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")


def _further(first: Found, second: Found, relation: str) -> bool:
    """The first's centre at least MIN_OFFSET px further in the named direction than the second's (y grows
    downwards: above = smaller y)."""
    if relation == "left of":
        return second.cx - first.cx >= MIN_OFFSET
    if relation == "right of":
        return first.cx - second.cx >= MIN_OFFSET
    if relation == "above":
        return second.cy - first.cy >= MIN_OFFSET
    return first.cy - second.cy >= MIN_OFFSET  # below


def right(query: Query, objects: list[Found]) -> bool:
    """Does the image whose objects are `objects` satisfy the query? The spec's table:

    single: exactly one object, of that colour and shape;
    two objects: exactly two objects, one of each named shape;
    counting: exactly that many objects, all of that colour and shape;
    colour attribution: exactly two objects, each with its named colour and shape;
    relative position: exactly two objects of the named kinds, and the first's centre at least 5 px
    further in the named direction than the second's."""
    c = query.category
    if c in ("single", "counting"):
        want = query.count if c == "counting" else 1
        return len(objects) == want and all(o.kind == tuple(query.kinds[0]) for o in objects)
    if len(objects) != 2:
        return False
    a, b = objects
    if c == "two_objects":
        return sorted([a.shape, b.shape]) == sorted(s for _, s in query.kinds)
    first, second = (tuple(k) for k in query.kinds)
    if c == "colour_attribution":
        return sorted([a.kind, b.kind]) == sorted([first, second])
    # position: prompts name two different kinds, so at most one assignment of the objects fits them.
    return any(x.kind == first and y.kind == second and _further(x, y, query.relation)
               for x, y in ((a, b), (b, a)))


FAILURES = ("objects", "unreadable", "kinds", "swapped", "relation")


def why_wrong(query: Query, objects: list[Found]) -> str | None:
    """None when right(query, objects); else the first of FAILURES that applies:
    objects: not as many objects as the prompt asks (1, 2, or the count);
    unreadable: as many, but one of them has none of the four shapes;
    kinds: as many, but their colours or shapes are not the ones named;
    swapped: colour attribution, the named colours and shapes both there but bound the other way round;
    relation: position, the named kinds but not in the named relation."""
    if right(query, objects):
        return None
    c = query.category
    if len(objects) != (query.count if c == "counting" else 1 if c == "single" else 2):
        return "objects"
    if any(o.shape < 0 for o in objects):
        return "unreadable"
    if c == "colour_attribution":
        (ca, sa), (cb, sb) = query.kinds
        if sorted(o.kind for o in objects) == sorted([(ca, sb), (cb, sa)]):
            return "swapped"
    if c == "position" and sorted(o.kind for o in objects) == sorted(tuple(k) for k in query.kinds):
        return "relation"
    return "kinds"


def judge_scene(query: Query, image) -> bool:
    return right(query, find_objects(image))


# ------------------------------------------------------------------------ the judge on ground truth

def check(scenes_list, vqgan=None, batch: int = 50) -> dict:
    """The judge on ground-truth renders of `scenes_list` (lists of datasets.scenes.SceneObject), or with
    `vqgan` on its reconstructions of them: an object is right when exactly one found object lies in its
    cell and it has the object's colour and shape; a scene is right when all its objects are and nothing
    else is found. Returns {"objects", "objects_right", "scenes", "scenes_right", "max_centre_error" (px,
    over right objects), "wrong": [scene numbers]}."""
    from datasets.scenes import render_scene

    images = [render_scene(objects) for objects in scenes_list]
    if vqgan is not None:
        images = _reconstruct(vqgan, images, batch)
    n_obj = n_right = n_scenes_right = 0
    worst, wrong = 0.0, []
    for k, (objects, image) in enumerate(zip(scenes_list, images)):
        found = find_objects(image)
        good = 0
        for o in objects:
            there = [f for f in found if f.cell == (o.row, o.col)]
            if len(there) == 1 and there[0].kind == o.kind:
                good += 1
                worst = max(worst, abs(there[0].cx - o.cx), abs(there[0].cy - o.cy))
        n_obj += len(objects)
        n_right += good
        if good == len(objects) == len(found):
            n_scenes_right += 1
        else:
            wrong.append(k)
    return {"objects": n_obj, "objects_right": n_right, "scenes": len(scenes_list), "scenes_right": n_scenes_right,
            "max_centre_error": worst, "wrong": wrong}


def _reconstruct(vqgan, images, batch: int) -> list:
    """The VQGAN's reconstructions (3, H, W) in [-1, 1] of PIL images, through its tokens, `batch` at a time."""
    import torch

    out = []
    device = next(vqgan.parameters()).device
    for i in range(0, len(images), batch):
        x = torch.stack([torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) for im in images[i:i + batch]])
        with torch.no_grad():
            _, tokens, _, _ = vqgan.encode(x.to(device) / 127.5 - 1)
            out.extend(vqgan.decode_indices(tokens).float().clamp(-1, 1).cpu())
    return out


def main(argv=None) -> int:
    """python -m evaluation.scenes_judge --renders 3000: the judge on the test split's first N scenes;
    exits 1 when the share of objects right is below --min-share (default 0.99, the spec's bar)."""
    import argparse
    import time

    from datasets.scenes import SPLIT_SEEDS, sample_scene

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--renders", type=int, default=3000, help="test-split scenes rendered and judged")
    p.add_argument("--min-share", type=float, default=0.99)
    p.add_argument("--vqgan", default=None, help="judge this VQGAN's reconstructions of the scenes instead")
    args = p.parse_args(argv)
    t0 = time.time()
    vqgan = None
    if args.vqgan:
        from models.convert import load_vqgan

        vqgan = load_vqgan(args.vqgan)
    r = check([sample_scene(SPLIT_SEEDS["test"], i) for i in range(args.renders)], vqgan)
    share = r["objects_right"] / max(1, r["objects"])
    what = f"reconstructions by {args.vqgan} of " if args.vqgan else ""
    print(f"{what}{r['scenes']} test scenes, {r['objects']} objects: {share:.2%} of objects right "
          f"({r['objects_right']}), {r['scenes_right'] / max(1, r['scenes']):.2%} of scenes all right; "
          f"box centres within {r['max_centre_error']:.2f} px; {time.time() - t0:.1f} s"
          + (f"; wrong scenes: {r['wrong'][:10]}" if r["wrong"] else ""))
    return 0 if share >= args.min_share else 1


if __name__ == "__main__":
    raise SystemExit(main())
