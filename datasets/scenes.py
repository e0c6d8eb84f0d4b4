"""The Shapes scenes world (specs/shapes-scenes.md, version 1): 1 to 4 coloured shapes on white.

Counts, colour binding and relative position, the things CLIP is known to be weak at, with exact labels.
Colours and shapes are the Shapes world's (datasets/shapes.py: indices into COLORS and SHAPES) and are
drawn by its renderer, so both worlds anti-alias identically. Every scene is a pure function of (split
seed, index). The phrase builders (noun_phrase, describe_groups, describe_relation) word the training
captions and the evaluation's prompts alike.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.robust import DataError
from datasets.shapes import BACKGROUND, CANVAS, COLORS, SHAPES, SyntheticSplit, draw_object
from datasets.transforms import EvalTransform, unpack_key

GRID = (11.0, 32.0, 53.0)  # centre coordinate in px of row/col 0, 1, 2 of the 3 x 3 grid
SIDE_RANGE = (14.0, 17.0)  # side of the bounding box in px, uniform
JITTER = 1.0  # px, uniform +- around the cell centre
# Cell centres are 21 px apart and jitter moves each by at most 1 px, so neighbouring boxes keep
# 21 - 2 * JITTER - SIDE_RANGE[1] = 2 px between them (MIN_GAP), and the outer boxes stay >= 1.5 px inside.
MIN_GAP = 2.0
N_PROBS = (0.25, 0.35, 0.25, 0.15)  # P(n objects = 1, 2, 3, 4)
MAX_OBJECTS = len(N_PROBS)
P_COPY = 0.4  # every object after the first copies the first's colour and shape with this probability
P_RELATION = 0.5  # two objects of different kinds: a relation caption instead of the groups

# Distinct from the Shapes world's seeds (1_000 ... 3_000, which evaluate.py offsets by small numbers), so
# the two worlds never share a random stream; the captioned splits share none with the unlabeled ones.
SPLIT_SEEDS = {
    "unlabeled-train": 21_000,
    "unlabeled-val": 21_001,
    "captioned-train": 22_000,
    "captioned-val": 22_001,
    "test": 23_000,
}

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}  # 1 is "a" / "an"
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# "{desc}" is a description that starts with its own article or number word: "two red circles".
TEMPLATES = (
    "{desc}",
    "a photo of {desc}",
    "an image of {desc}",
    "a picture of {desc}",
    "a drawing of {desc}",
    "{desc} on a white background",
    "a photo of {desc} on a white background",
)

Kind = tuple[int, int]  # (colour index, shape index)


@dataclass(frozen=True)
class SceneObject:
    """One object: indices into COLORS and SHAPES, its grid cell (row, col in 0..2) and its exact geometry
    in px (the bounding box is side x side centred at (cx, cy); pixel (x, y) covers [x, x+1) x [y, y+1))."""

    color: int
    shape: int
    row: int
    col: int
    side: float
    cx: float
    cy: float

    @property
    def kind(self) -> Kind:
        return self.color, self.shape

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the bounding box."""
        h = self.side / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


def place(kinds: Sequence[tuple[int, int, int, int]], rng: np.random.Generator) -> list[SceneObject]:
    """Objects of the given (color, shape, row, col), in that order, with side and jitter drawn from rng
    (for each object: side, then x and y jitter). Cells must be distinct: that is what keeps objects apart."""
    cells = [(r, c) for _, _, r, c in kinds]
    if len(set(cells)) != len(cells):
        raise ValueError(f"objects must take distinct cells, got {cells}")
    if not 1 <= len(kinds) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(kinds)}")
    out = []
    for color, shape, row, col in kinds:
        if not (0 <= color < len(COLORS) and 0 <= shape < len(SHAPES) and 0 <= row < 3 and 0 <= col < 3):
            raise ValueError(f"object (color {color}, shape {shape}, row {row}, col {col}) out of range")
        side = float(rng.uniform(*SIDE_RANGE))
        jx, jy = (float(j) for j in rng.uniform(-JITTER, JITTER, size=2))
        out.append(SceneObject(int(color), int(shape), int(row), int(col), side, GRID[col] + jx, GRID[row] + jy))
    return out


def sample_scene(split_seed: int, index: int) -> list[SceneObject]:
    """The scene of item `index` of the split with seed `split_seed`; a pure function of both. The list
    is in drawing order: objects[0] is the first object, the one the others may copy."""
    rng = np.random.default_rng([split_seed, index])
    n = int(rng.choice(MAX_OBJECTS, p=N_PROBS)) + 1
    cells = [int(c) for c in rng.choice(9, size=n, replace=False)]  # uniformly without replacement
    kinds = [(int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))))]
    for _ in range(n - 1):
        if rng.random() < P_COPY:
            kinds.append(kinds[0])
        else:
            kinds.append((int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))))
    return place([(c, s, cell // 3, cell % 3) for (c, s), cell in zip(kinds, cells)], rng)


def _hull(o: SceneObject) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = o.box()
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def render_scene(objects: Sequence[SceneObject]) -> Image.Image:
    """64 x 64 RGB image: white, each object drawn by the Shapes world's renderer (datasets.shapes.draw_object:
    4x supersampled, box-filtered, exact palette colour inside). Each object's patch covers its box's
    whole-pixel hull; hulls must not overlap (they never do for objects in distinct cells)."""
    hulls = [_hull(o) for o in objects]
    for i, a in enumerate(hulls):
        if not (0 <= a[0] and 0 <= a[1] and a[2] <= CANVAS and a[3] <= CANVAS):
            raise ValueError(f"object {objects[i]} leaves the canvas")
        for b in hulls[:i]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                raise ValueError(f"objects overlap: pixel hulls {a} and {b}")
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    for o in objects:
        draw_object(image, o.color, o.shape, o.box())
    return image


# ---- words ------------------------------------------------------------------------------------------------

def noun_phrase(color: int | None, shape: int, count: int = 1) -> str:
    """"a red circle", "an orange square", "three green triangles"; colour None names the shape alone
    ("a circle", "two squares")."""
    if not 1 <= count <= MAX_OBJECTS:
        raise ValueError(f"count must be 1 to {MAX_OBJECTS}, got {count}")
    words = ([COLORS[color][0]] if color is not None else []) + [SHAPES[shape] + ("s" if count > 1 else "")]
    # Every word of this vocabulary that starts with a vowel letter also starts with a vowel sound.
    first = NUMBER_WORDS[count] if count > 1 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([first, *words])


def join_phrases(phrases: Sequence[str]) -> str:
    """"X", "X and Y", "X, Y and Z"."""
    if not phrases:
        raise ValueError("nothing to join")
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_groups(groups: Sequence[tuple[int | None, int, int]]) -> str:
    """(color or None, shape, count) groups, in the given order -> "two red circles and a blue square"."""
    return join_phrases([noun_phrase(c, s, n) for c, s, n in groups])


def describe_relation(a: tuple[int | None, int], relation: str, b: tuple[int | None, int]) -> str:
    """((color, shape), "left of", (color, shape)) -> "a red circle to the left of a blue square"."""
    if relation not in RELATION_PHRASES:
        raise ValueError(f"unknown relation {relation!r}; choose from {RELATIONS}")
    return f"{noun_phrase(a[0], a[1])} {RELATION_PHRASES[relation]} {noun_phrase(b[0], b[1])}"


def apply_template(desc: str, template: int = 0) -> str:
    """`desc` worded by TEMPLATES[template]: "a photo of two red circles"."""
    return TEMPLATES[template].format(desc=desc)


def groups_of(objects: Sequence[SceneObject]) -> list[tuple[int, int, int]]:
    """(color, shape, count) per distinct kind, in order of first appearance."""
    counts = Counter(o.kind for o in objects)  # insertion-ordered
    return [(c, s, n) for (c, s), n in counts.items()]


def relations_between(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations of RELATIONS that are true of a with respect to b, read from the cells: left of =
    smaller column, above = smaller row (two for diagonal neighbours, none for the same cell)."""
    out = []
    if a.col != b.col:
        out.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        out.append("above" if a.row < b.row else "below")
    return out


# What a caption says before it is worded: (template index, ("groups", [(color, shape, count), ...]) or
# ("relation", (color, shape), relation, (color, shape))).
CaptionPlan = tuple[int, tuple]


def caption_plan(objects: Sequence[SceneObject], rng: np.random.Generator) -> CaptionPlan:
    """What caption_scene says about `objects` (same draws from rng, so the same caption)."""
    template = int(rng.integers(len(TEMPLATES)))
    if len(objects) == 2 and objects[0].kind != objects[1].kind and rng.random() < P_RELATION:
        first = int(rng.integers(2))
        a, b = objects[first], objects[1 - first]
        true = relations_between(a, b)
        return template, ("relation", a.kind, true[int(rng.integers(len(true)))], b.kind)
    groups = groups_of(objects)
    return template, ("groups", [groups[k] for k in rng.permutation(len(groups))])


def word_plan(plan: CaptionPlan) -> str:
    template, desc = plan
    text = describe_relation(*desc[1:]) if desc[0] == "relation" else describe_groups(desc[1])
    return apply_template(text, template)


def caption_scene(objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    """A training caption: every object, by groups of identical kind in random order with their counts;
    two objects of different kinds are instead, with probability P_RELATION, named with a relation that
    holds (which of the two comes first, and for diagonal cells which relation, drawn uniformly)."""
    return word_plan(caption_plan(objects, rng))


# ---- hard negatives (NegCLIP-style extra negative texts for train_clip.py --hard-negatives) ----------------

HARD_NEGATIVES = ("swapped colours", "mirrored relation", "count", "other shape", "other colour")


def _hard_negative_options(desc: tuple) -> dict[str, list[tuple]]:
    """Every description that changes exactly one binding of a true, complete one (`desc` of a CaptionPlan)
    and so is false of its scene, by HARD_NEGATIVES name. Group descriptions stay one group per kind and 1 to
    MAX_OBJECTS objects in all; relation descriptions keep one object per side."""
    n_c, n_s = len(COLORS), len(SHAPES)
    out: dict[str, list[tuple]] = {name: [] for name in HARD_NEGATIVES}
    if desc[0] == "relation":
        _, (ca, sa), rel, (cb, sb) = desc
        # Either wording of the mirror: the relation word, or the two sides trading places.
        out["mirrored relation"] += [("relation", (ca, sa), MIRROR[rel], (cb, sb)),
                                     ("relation", (cb, sb), rel, (ca, sa))]
        if ca != cb and sa != sb:  # with one of them equal, a colour swap is no change or the mirror
            out["swapped colours"].append(("relation", (cb, sa), rel, (ca, sb)))
        scene = {(ca, sa), (cb, sb)}
        for side in (0, 1):
            c, s = ((ca, sa), (cb, sb))[side]
            for new in [(c, t) for t in range(n_s) if t != s] + [(d, s) for d in range(n_c) if d != c]:
                if new not in scene:  # a kind the scene lacks
                    kinds = [(ca, sa), (cb, sb)]
                    kinds[side] = new
                    out["other shape" if new[0] == c else "other colour"].append(("relation", kinds[0], rel, kinds[1]))
        return out
    groups = list(desc[1])
    kinds = {(c, s) for c, s, _ in groups}
    total = sum(n for _, _, n in groups)
    for i, (c, s, n) in enumerate(groups):
        for m in (n - 1, n + 1):
            if 1 <= m and 1 <= total - n + m <= MAX_OBJECTS:
                out["count"].append(("groups", groups[:i] + [(c, s, m)] + groups[i + 1:]))
        for new in [(c, t) for t in range(n_s) if t != s] + [(d, s) for d in range(n_c) if d != c]:
            if new not in kinds:
                out["other shape" if new[0] == c else "other colour"].append(
                    ("groups", groups[:i] + [(*new, n)] + groups[i + 1:]))
        for j in range(i + 1, len(groups)):
            cj, sj, nj = groups[j]
            if c != cj and s != sj and not {(cj, s), (c, sj)} & kinds:
                swapped = list(groups)
                swapped[i], swapped[j] = (cj, s, n), (c, sj, nj)
                out["swapped colours"].append(("groups", swapped))
    return out


def hard_negative_plan(plan: CaptionPlan, rng: np.random.Generator, p_mirror: float = 1.0) -> tuple[str, CaptionPlan]:
    """(name, plan): the caption `plan` with one binding changed, same template, false of the scene. A
    relation caption is mirrored with probability p_mirror (the relation is what only these ~11% of
    captions say); otherwise a name of HARD_NEGATIVES is drawn uniformly among those that apply, then one
    change of it uniformly. Every caption has one: a count can always move by one, a relation be mirrored."""
    template, desc = plan
    options = {k: v for k, v in _hard_negative_options(desc).items() if v}
    if desc[0] == "relation" and rng.random() < p_mirror:
        options = {"mirrored relation": options["mirrored relation"]}
    name = list(options)[int(rng.integers(len(options)))]
    return name, (template, options[name][int(rng.integers(len(options[name])))])


def objects_tensor(objects: Sequence[SceneObject]) -> torch.Tensor:
    """(MAX_OBJECTS, 4) long: rows of (color, shape, row, col), padded with -1 (fixed size for default_collate)."""
    out = torch.full((MAX_OBJECTS, 4), -1, dtype=torch.long)
    for i, o in enumerate(objects):
        out[i] = torch.tensor([o.color, o.shape, o.row, o.col])
    return out


class ScenesDataset(SyntheticSplit):
    """`length` items of one split of the scenes world, like datasets.shapes.ShapesDataset. Items carry
    `n_objects`, `objects` (objects_tensor) and, for captioned splits, a caption. Resolutions other than 64
    resize the whole image (no crop: positions are labels). Items are fixed by (split, index); the seed of
    an (index, seed) key is not used."""

    WORLD = "scenes"
    SPLIT_SEEDS = SPLIT_SEEDS

    def scene(self, index: int) -> list[SceneObject]:
        return sample_scene(self.split_seed, index)

    def caption(self, index: int, objects: Sequence[SceneObject] | None = None) -> str:
        # Its own stream (a third seed word), so captions do not shift if scene sampling changes.
        rng = np.random.default_rng([self.split_seed, index, 1])
        return caption_scene(objects if objects is not None else self.scene(index), rng)

    def caption_plan(self, index: int, objects: Sequence[SceneObject] | None = None) -> CaptionPlan:
        """What caption(index) says, before wording (same stream)."""
        objects = objects if objects is not None else self.scene(index)
        return caption_plan(objects, np.random.default_rng([self.split_seed, index, 1]))

    def hard_negative_plan(self, index: int, objects: Sequence[SceneObject] | None = None) -> tuple[str, CaptionPlan]:
        """(name, plan) of a caption that differs from caption(index) in one binding and is false of the scene
        (hard_negative_plan; its own stream, a fourth seed word). word_plan(plan) is its text."""
        plan = self.caption_plan(index, objects)
        return hard_negative_plan(plan, np.random.default_rng([self.split_seed, index, 2]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = unpack_key(key)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a scenes split of {self.length} items")
        objects = self.scene(index)
        item = {"image": self.transform(render_scene(objects)), "index": index, "skipped": 0,
                "n_objects": len(objects), "objects": objects_tensor(objects)}
        if self.captioned:
            item["caption"] = self.caption(index, objects)
        return item
