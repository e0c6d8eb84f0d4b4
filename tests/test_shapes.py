import collections
import math

import numpy as np
import pytest
import torch

from datasets.shapes import (COLORS, COLS, GRID, POSITION_PHRASES, ROWS, SHAPES, SIZE_RANGES, SIZES, SPLIT_SEEDS,
                             ShapeSpec, ShapesDataset, caption, describe, render, sample_attributes)

WHITE = (255, 255, 255)


def rendered(count, split_seed=7):
    """(spec, (64, 64, 3) uint8 pixels) for the first `count` items of a split."""
    for i in range(count):
        spec = sample_attributes(split_seed, i)
        yield spec, np.asarray(render(spec))


def coverage(spec, pixels):
    """(64, 64) share of each pixel covered by the object, read from its highest-contrast channel."""
    palette = np.array(COLORS[spec.color][1], dtype=float)
    channel = int(np.argmax(255 - palette))
    return (255 - pixels[..., channel].astype(float)) / (255 - palette[channel])


def test_same_split_and_index_give_identical_items():
    a, b = ShapesDataset("unlabeled-train", 100), ShapesDataset("unlabeled-train", 100)
    for i in (0, 17, 99):
        assert sample_attributes(SPLIT_SEEDS["unlabeled-train"], i) == a.spec(i)
        x, y = a[i], b[(i, 12345)]  # the seed of a key does not change a Shapes item
        assert torch.equal(x["image"], y["image"])
        assert {k: x[k] for k in ("color", "shape", "size", "row", "col")} == \
               {k: y[k] for k in ("color", "shape", "size", "row", "col")}


def test_splits_differ():
    assert len(set(SPLIT_SEEDS.values())) == len(SPLIT_SEEDS)
    images = {split: torch.stack([ShapesDataset(split, 20)[i]["image"] for i in range(20)]) for split in SPLIT_SEEDS}
    splits = list(images)
    for i, s in enumerate(splits):
        for t in splits[i + 1:]:
            assert not any(torch.equal(x, y) for x, y in zip(images[s], images[t])), (s, t)


def test_core_has_exact_palette_colour_and_background_is_white():
    for spec, pixels in rendered(300):
        # Triangle: its widest solid part is below the box centre (centroid at cy + side/6).
        y = spec.cy + spec.side / 6 if SHAPES[spec.shape] == "triangle" else spec.cy
        assert tuple(pixels[int(y), int(spec.cx)]) == COLORS[spec.color][1], spec
        # The 1 px margin keeps the whole outer ring of pixels white.
        ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (ring == 255).all(), spec


def test_edges_blend_only_palette_and_white():
    """Box-filter anti-aliasing: every pixel is (1 - t) * white + t * palette with one t in [0, 1] for all
    channels; a filter that rings would overshoot past the palette or tint edges with other hues."""
    for spec, pixels in rendered(200):
        palette = np.array(COLORS[spec.color][1], dtype=float)
        values = pixels.reshape(-1, 3).astype(float)  # (4096, 3)
        assert ((values >= palette) & (values <= 255)).all(), spec
        channels = np.flatnonzero(255 - palette >= 60)  # enough contrast to read t to within 0.01
        t = (255 - values[:, channels]) / (255 - palette[channels])  # (4096, C)
        assert (t.max(axis=1) - t.min(axis=1) <= 0.02).all(), spec


def test_object_extent_and_area_match_the_spec():
    areas = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
    for spec, pixels in rendered(300):
        ys, xs = np.nonzero((pixels != 255).any(axis=-1))
        # A box of side s spans s pixels plus up to two partly covered boundary pixels.
        for extent in (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1):
            assert spec.side - 1 <= extent <= spec.side + 2, spec
        assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= 62 and ys.max() <= 62
        cover = coverage(spec, pixels)
        assert cover.sum() == pytest.approx(areas[SHAPES[spec.shape]] * spec.side ** 2, rel=0.05), spec
        if SHAPES[spec.shape] == "square":
            # Pixels more than half covered: side +- 1, plus 1/4 px for the 4x sub-pixel grid.
            ys, xs = np.nonzero(cover > 0.5)
            for extent in (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1):
                assert abs(extent - spec.side) <= 1.25, spec


def test_triangle_points_up_and_diamond_corners_sit_at_edge_midpoints():
    seen = collections.Counter()
    for spec, pixels in rendered(200):
        mask = coverage(spec, pixels) > 0.5
        x0, y0, x1, y1 = spec.box()
        if SHAPES[spec.shape] == "triangle":
            width = mask.sum(axis=1)  # (64,) filled pixels per row
            assert width[int(y0 + spec.side * 0.25)] < width[int(y0 + spec.side * 0.75)], spec
            seen["triangle"] += 1
        elif SHAPES[spec.shape] == "diamond":
            ys, xs = np.nonzero(mask)
            assert abs(ys[xs.argmin()] + 0.5 - spec.cy) <= 1.5 and abs(xs.min() - x0) <= 1.5  # left corner
            assert abs(ys[xs.argmax()] + 0.5 - spec.cy) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5  # right
            assert abs(xs[ys.argmin()] + 0.5 - spec.cx) <= 1.5 and abs(ys.min() - y0) <= 1.5  # top
            assert abs(xs[ys.argmax()] + 0.5 - spec.cx) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5  # bottom
            seen["diamond"] += 1
    assert seen["triangle"] > 10 and seen["diamond"] > 10


def test_attributes_are_uniform_and_geometry_follows_the_grid():
    specs = [sample_attributes(SPLIT_SEEDS["unlabeled-train"], i) for i in range(4000)]
    for field, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("row", ROWS), ("col", COLS)):
        counts = collections.Counter(getattr(s, field) for s in specs)
        assert sorted(counts) == list(range(len(values))), field
        for count in counts.values():
            assert abs(count / len(specs) - 1 / len(values)) < 0.03, field
    for s in specs:
        lo, hi = SIZE_RANGES[s.size]
        assert lo <= s.side <= hi
        half = s.side / 2
        for centre, cell in ((s.cx, s.col), (s.cy, s.row)):
            assert abs(centre - GRID[cell]) <= 3 + 1e-9
            assert 1 + half - 1e-9 <= centre <= 63 - half + 1e-9


def test_captions_name_the_right_attributes_at_the_right_rates():
    ds = ShapesDataset("captioned-train", 400)
    named_size = named_position = 0
    for i in range(len(ds)):
        spec, text = ds.spec(i), ds[i]["caption"]
        assert text == ds.caption(i)  # deterministic
        assert f"{COLORS[spec.color][0]} {SHAPES[spec.shape]}" in text
        wrong = [p for key, p in POSITION_PHRASES.items() if key != (ROWS[spec.row], COLS[spec.col]) and p in text]
        assert not wrong, text
        named_position += POSITION_PHRASES[ROWS[spec.row], COLS[spec.col]] in text
        words = text.split()
        assert SIZES[1 - spec.size] not in words, text
        named_size += SIZES[spec.size] in words
        assert "a orange" not in text and "an red" not in text
    assert named_size >= 0.4 * len(ds) and named_position >= 0.4 * len(ds)


def test_describe_names_exactly_the_given_attributes():
    spec = ShapeSpec(color=1, shape=0, size=0, row=0, col=0, side=16.0, cx=16.0, cy=16.0)
    assert describe(spec) == "a small orange circle in the top left"
    assert describe(spec, {"color", "shape"}) == "an orange circle"
    assert describe(spec, {"color"}) == "an orange shape"
    assert describe(spec, {"shape", "position"}, template=1) == "a photo of a circle in the top left"
    middle = ShapeSpec(color=0, shape=3, size=1, row=1, col=1, side=28.0, cx=32.0, cy=32.0)
    assert describe(middle, {"size", "shape", "position"}) == "a large diamond in the center"
    with pytest.raises(ValueError):
        describe(spec, {"colour"})
    texts = {caption(spec, np.random.default_rng(seed)) for seed in range(200)}
    assert len(texts) > 10  # several templates and optional attributes are in use


def test_dataset_items_follow_the_contract():
    item = ShapesDataset("unlabeled-val", 10)[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() == 1  # white background maps to 1
    assert item["index"] == 3 and item["skipped"] == 0 and "caption" not in item
    assert set(item) >= {"color", "shape", "size", "row", "col"}
    assert "caption" in ShapesDataset("captioned-val", 10)[3]
    assert "caption" not in ShapesDataset("captioned-val", 10, captioned=False)[3]
    assert ShapesDataset("test", 10, resolution=32)[0]["image"].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ShapesDataset("test", 10)[10]
    with pytest.raises(ValueError, match="unknown Shapes split"):
        ShapesDataset("training")
