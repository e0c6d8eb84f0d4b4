"""The scenes world (specs/shapes-scenes.md): deterministic scenes whose statistics are the spec's, objects
that never touch, exact palette colours, captions that name every object with the right counts (and true
relations), --dataset scenes on the trainers, and a Shapes world whose pixels the shared renderer kept."""
import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

import datasets
from datasets import scenes, shapes
from datasets.scenes import (COLORS, GRID, MAX_OBJECTS, SHAPES, SPLIT_SEEDS, TEMPLATES, SceneObject, ScenesDataset,
                             caption_scene, describe_groups, describe_relation, noun_phrase, place, render_scene,
                             sample_scene)
from evaluation.scenes_zero_shot import scene_accuracies, scene_name, scene_zero_shot_counts
from tests import forkrun

SEED = SPLIT_SEEDS["captioned-train"]


def sigma(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


# ---- scenes ---------------------------------------------------------------------------------------------

def test_same_split_and_index_give_identical_items():
    a, b = ScenesDataset("captioned-train", 50), ScenesDataset("captioned-train", 50)
    for i in (0, 7, 49):
        assert sample_scene(SEED, i) == a.scene(i)
        x, y = a[i], b[(i, 12345)]  # the seed of a key does not change a scenes item
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["objects"], y["objects"])
        assert x["caption"] == y["caption"] == a.caption(i)


def test_splits_differ_and_their_seeds_are_not_the_shapes_worlds():
    assert len(set(SPLIT_SEEDS.values())) == len(SPLIT_SEEDS)
    assert not set(SPLIT_SEEDS.values()) & set(shapes.SPLIT_SEEDS.values())
    seeds = list(SPLIT_SEEDS.values())
    for i, s in enumerate(seeds):
        for t in seeds[i + 1:]:
            assert sum(sample_scene(s, k) == sample_scene(t, k) for k in range(30)) == 0, (s, t)


def test_counts_cells_copies_and_geometry_follow_the_spec():
    n = 3000
    all_scenes = [sample_scene(SEED, i) for i in range(n)]
    sizes = Counter(len(s) for s in all_scenes)
    for k, p in enumerate(scenes.N_PROBS, 1):
        assert abs(sizes[k] / n - p) < 4 * sigma(p, n), (k, sizes)
    # Every object after the first copies the first's colour and shape with p 0.4, else both are uniform:
    # P(same kind) = 0.4 + 0.6 / 32; P(same colour, other shape) = 0.6 * 1/8 * 3/4.
    firsts = [s[0] for s in all_scenes]
    further = [(s[0], o) for s in all_scenes for o in s[1:]]
    same = np.mean([f.kind == o.kind for f, o in further])
    colour_only = np.mean([f.color == o.color and f.shape != o.shape for f, o in further])
    assert abs(same - (0.4 + 0.6 / 32)) < 4 * sigma(0.41875, len(further)), same
    assert abs(colour_only - 0.6 * 3 / 32) < 4 * sigma(0.05625, len(further)), colour_only
    for values, k in (([o.color for o in firsts], len(COLORS)), ([o.shape for o in firsts], len(SHAPES)),
                      ([o.row * 3 + o.col for s in all_scenes for o in s], 9)):
        counts = np.bincount(values, minlength=k)
        expected = len(values) / k
        assert np.abs(counts - expected).max() < 5 * (expected * (1 - 1 / k)) ** 0.5, counts
    for s in all_scenes:
        assert len({(o.row, o.col) for o in s}) == len(s)  # distinct cells
    objects = [o for s in all_scenes for o in s]
    sides = np.array([o.side for o in objects])
    jitter = np.array([(o.cx - GRID[o.col], o.cy - GRID[o.row]) for o in objects])
    assert sides.min() >= 14 and sides.max() <= 17 and abs(sides.mean() - 15.5) < 0.05
    assert np.abs(jitter).max() <= 1 and np.abs(jitter).min() < 0.01 and np.abs(jitter).max() > 0.99
    assert np.abs(jitter.mean(0)).max() < 0.03


def _solo(o: SceneObject) -> np.ndarray:
    return np.asarray(render_scene([o]))


def test_objects_never_touch_and_keep_their_exact_palette_colour():
    white = np.full(3, 255)
    for i in range(300):
        objects = sample_scene(SEED, i)
        pixels = np.asarray(render_scene(objects))
        solos = [_solo(o) for o in objects]
        # Each object's patch covers only white pixels of the others: the scene is the union of its objects.
        assert np.array_equal(pixels, np.minimum.reduce(solos)), i
        masks = [(p != white).any(-1) for p in solos]
        for a in range(len(objects)):
            o = objects[a]
            y = o.cy + o.side / 6 if SHAPES[o.shape] == "triangle" else o.cy  # a triangle is solid lower down
            assert tuple(pixels[int(y), int(o.cx)]) == COLORS[o.color][1], (i, o)
            for b in range(a):
                ax0, ay0, ax1, ay1 = o.box()
                bx0, by0, bx1, by1 = objects[b].box()
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= scenes.MIN_GAP - 1e-9, (i, a, b)
                # From pixels: a white pixel lies between them (no 8-neighbours across objects).
                grown = np.pad(masks[a], 1)
                grown = np.logical_or.reduce([grown[1 + dy:65 + dy, 1 + dx:65 + dx]
                                              for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
                assert not (grown & masks[b]).any(), (i, a, b)
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (ring == 255).all(), i


def test_one_object_is_drawn_as_the_shapes_world_draws_it():
    rng = np.random.default_rng(0)
    for color, shape, row, col in [(0, 0, 0, 0), (1, 1, 1, 2), (2, 2, 2, 1), (5, 3, 1, 1)]:
        (o,) = place([(color, shape, row, col)], rng)
        spec = shapes.ShapeSpec(color, shape, 0, row, col, o.side, o.cx, o.cy)
        assert render_scene([o]).tobytes() == shapes.render(spec).tobytes()


def test_place_and_render_refuse_what_would_overlap():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="distinct cells"):
        place([(0, 0, 1, 1), (1, 1, 1, 1)], rng)
    a = SceneObject(0, 0, 1, 1, 16.0, 32.0, 32.0)
    with pytest.raises(ValueError, match="overlap"):
        render_scene([a, SceneObject(1, 1, 1, 2, 16.0, 45.0, 32.0)])


# ---- shapes world unchanged ------------------------------------------------------------------------------

# sha256 of the renders of items 0..299 of every Shapes split, by datasets/shapes.py as it was before the
# scenes world shared its renderer (commit 3c538ae): the Shapes world's pixels, checkpoints and numbers stay.
SHAPES_RENDERS_SHA256 = "ac179bf23fa44b39812408b23b3620b5b3ab844e79f5fd444917dc40aea97e41"


def test_shapes_world_pixels_are_unchanged():
    h = hashlib.sha256()
    for seed in shapes.SPLIT_SEEDS.values():
        for i in range(300):
            h.update(shapes.render(shapes.sample_attributes(seed, i)).tobytes())
    assert h.hexdigest() == SHAPES_RENDERS_SHA256


# ---- captions ------------------------------------------------------------------------------------------

COLOR_OF = {name: i for i, (name, _) in enumerate(COLORS)}
SHAPE_OF = {name: i for i, name in enumerate(SHAPES)}
COUNT_OF = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
RELATION_WORDS = {" to the left of ": "left of", " to the right of ": "right of", " above ": "above",
                  " below ": "below"}


def parse_noun(text: str) -> tuple[int, int, int]:
    """"two red circles" -> (color, shape, count), checking the article and the plural."""
    first, colour, noun = text.split(" ")
    count = COUNT_OF[first]
    if count == 1:
        assert first == ("an" if colour[0] in "aeiou" else "a") and not noun.endswith("s"), text
        return COLOR_OF[colour], SHAPE_OF[noun], 1
    assert noun.endswith("s"), text
    return COLOR_OF[colour], SHAPE_OF[noun[:-1]], count


def parse_caption(caption: str):
    """(template, ("groups", [(color, shape, count), ...]) or ("relation", kind, relation, kind))."""
    prefix = next((p for p in ("a photo of ", "an image of ", "a picture of ", "a drawing of ")
                   if caption.startswith(p)), "")
    suffix = " on a white background" if caption.endswith(" on a white background") else ""
    desc = caption[len(prefix):len(caption) - len(suffix)]
    for words, relation in RELATION_WORDS.items():
        if words in desc:
            a, b = desc.split(words)
            (ca, sa, na), (cb, sb, nb) = parse_noun(a), parse_noun(b)
            assert na == nb == 1, caption
            return (prefix, suffix), ("relation", (ca, sa), relation, (cb, sb))
    parts = re.split(r", | and ", desc)
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    assert joined == desc, caption  # "X", "X and Y", "X, Y and Z"
    return (prefix, suffix), ("groups", [parse_noun(p) for p in parts])


def test_captions_name_every_object_with_its_count_or_a_true_relation():
    ds = ScenesDataset("captioned-train", 600)
    templates, first_listed, relation = Counter(), Counter(), Counter()
    for i in range(600):
        objects = ds.scene(i)
        template, parsed = parse_caption(ds.caption(i, objects))
        templates[template] += 1
        kinds = Counter(o.kind for o in objects)
        eligible = len(objects) == 2 and len(kinds) == 2
        if parsed[0] == "relation":
            assert eligible, (i, objects)
            _, a, rel, b = parsed
            oa, ob = (next(o for o in objects if o.kind == k) for k in (a, b))
            assert {a, b} == set(kinds)
            assert {"left of": oa.col < ob.col, "right of": oa.col > ob.col, "above": oa.row < ob.row,
                    "below": oa.row > ob.row}[rel], (i, objects, rel)
        else:
            groups = parsed[1]
            assert len({(c, s) for c, s, _ in groups}) == len(groups)  # one group per kind
            assert {(c, s): k for c, s, k in groups} == dict(kinds), (i, objects, groups)
            if len(groups) > 1:
                first_listed[(groups[0][0], groups[0][1]) == objects[0].kind] += 1
        if eligible:
            relation[parsed[0]] += 1
    assert len(templates) == len(TEMPLATES)  # every template is used
    assert min(first_listed[True], first_listed[False]) > 0.3 * sum(first_listed.values())  # random group order
    share = relation["relation"] / sum(relation.values())
    assert abs(share - 0.5) < 4 * sigma(0.5, sum(relation.values())), relation


def test_diagonal_pairs_are_named_by_either_relation():
    rng = np.random.default_rng(0)
    a, b = place([(0, 0, 0, 0), (5, 1, 2, 2)], rng)  # red circle top left, blue square bottom right
    parsed = [parse_caption(caption_scene([a, b], rng))[1] for _ in range(200)]
    said = Counter(p[2] for p in parsed if p[0] == "relation")
    assert set(said) == {"left of", "right of", "above", "below"}  # both orders of naming, both axes


def test_phrase_builders():
    assert noun_phrase(1, 1, 1) == "an orange square"
    assert noun_phrase(0, 0, 3) == "three red circles"
    assert noun_phrase(None, 2, 1) == "a triangle" and noun_phrase(None, 3, 4) == "four diamonds"
    assert describe_groups([(0, 0, 2), (5, 1, 1)]) == "two red circles and a blue square"
    assert describe_groups([(0, 0, 1), (5, 1, 1), (7, 2, 1)]) == "a red circle, a blue square and a black triangle"
    assert describe_groups([(None, 0, 1), (None, 2, 1)]) == "a circle and a triangle"
    assert describe_relation((0, 0), "left of", (5, 1)) == "a red circle to the left of a blue square"
    assert describe_relation((2, 3), "below", (4, 0)) == "a yellow diamond below a cyan circle"
    assert scenes.apply_template("two red circles", 5) == "two red circles on a white background"
    with pytest.raises(ValueError):
        noun_phrase(0, 0, 5)


# ---- dataset, trainers ----------------------------------------------------------------------------------

def test_items_carry_padded_object_lists_and_collate():
    ds = ScenesDataset("unlabeled-train", 40)
    items = [ds[i] for i in range(8)]
    assert "caption" not in items[0]
    batch = torch.utils.data.default_collate(items)
    assert batch["image"].shape == (8, 3, 64, 64) and batch["objects"].shape == (8, MAX_OBJECTS, 4)
    for i, item in enumerate(items):
        objects = ds.scene(i)
        assert item["n_objects"] == len(objects)
        assert item["objects"][:len(objects)].tolist() == [[o.color, o.shape, o.row, o.col] for o in objects]
        assert (item["objects"][len(objects):] == -1).all()


def test_dataset_flag_builds_scenes_and_text_conditioning_takes_the_captioned_split():
    import train_gpt

    args = train_gpt.parse_args(["--vqgan", "v", "--clip", "c", "--dataset", "scenes", "--cond", "text",
                                 "--shapes-train-size", "10", "--shapes-val-size", "5"])
    train, val = datasets.build_datasets(args, 64)
    assert isinstance(train, ScenesDataset) and (train.split, val.split) == ("captioned-train", "captioned-val")
    assert len(train) == 10 and datasets.has_captions(train)


class _Oracle:
    """A stand-in CLIP that knows each image's scene name (or, wrong=True, always answers the next name)."""

    def __init__(self, ds, wrong=False):
        self.names = sorted({scene_name(ds.scene(i)) for i in range(len(ds))})
        self.by_image = {ds[i]["image"].numpy().tobytes(): scene_name(ds.scene(i)) for i in range(len(ds))}
        self.shift = int(wrong)

    def encode_text(self, texts):
        return torch.eye(len(self.names))[[self.names.index(t) for t in texts]]

    def encode_image(self, images):
        rows = [(self.names.index(self.by_image[x.numpy().tobytes()]) + self.shift) % len(self.names) for x in images]
        return torch.eye(len(self.names))[rows]


def test_scene_zero_shot_counts_each_object_count():
    ds = ScenesDataset("captioned-val", 40)
    per_count = Counter(len(ds.scene(i)) for i in range(40))
    right = scene_zero_shot_counts(_Oracle(ds), ds, batch_size=16)
    assert right[1].tolist() == [per_count[n] for n in range(1, MAX_OBJECTS + 1)]
    assert torch.equal(right[0], right[1]) and scene_accuracies(right)["all"] == 1.0
    share = scene_zero_shot_counts(_Oracle(ds), ds, range(0, 40, 2))  # a rank's share: the same candidates
    assert share[1].sum() == 20 and torch.equal(share[0], share[1])
    assert scene_zero_shot_counts(_Oracle(ds, wrong=True), ds)[0].sum() == 0


def _run(args, timeout=300):
    return forkrun.run(*args, timeout=timeout)  # `python args` through the fork server (tests/forkrun.py)


def test_train_clip_learns_scene_captions(tmp_path):
    r = _run(["train_clip.py", "--preset", "tiny", "--dataset", "scenes", "--no-tensorboard", "--num-workers", "0",
              "--max-steps", "2", "--batch-size", "8", "--val-every", "2", "--shapes-train-size", "16",
              "--shapes-val-size", "12", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert re.search(r"^val scenes: 1 \S+ 2 \S+ 3 \S+ 4 \S+ all \S+$", r.stdout, re.M), r.stdout
    assert "scenes named, by object count" in r.stdout and (tmp_path / "best.pt").is_file()

