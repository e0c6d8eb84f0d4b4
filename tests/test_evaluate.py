"""evaluate.py's statistics: the Fréchet distance and the diversity of unnamed attributes."""
from types import SimpleNamespace

import pytest
import torch

from evaluate import diversity, frechet_distance, right
from datasets import shapes


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # Columns 1..3 of a Hadamard matrix are zero-mean and orthogonal: the sample covariance is exactly diagonal.
    h = _hadamard(8)[:, 1:4]
    sa, sb, shift = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5]), torch.tensor([1.0, -2.0, 0.0])
    a, b = h * sa, h * sb + shift
    var_a, var_b = sa.double() ** 2 * 8 / 7, sb.double() ** 2 * 8 / 7
    expected = shift.double().square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_is_zero_for_one_set_and_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(500, 6, generator=g) * 2 + 1
    assert abs(frechet_distance(a, a)) < 1e-8
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert frechet_distance(a, b) > 1.0


def _j(found=True, color=0, shape=0, size=0, row=0, col=0):
    return SimpleNamespace(found=found, color=color, shape=shape, size=size, row=row, col=col,
                           labels=lambda: {"color": color, "shape": shape, "size": size, "row": row, "col": col})


def test_diversity_counts_distinct_values_of_found_objects():
    judged = [_j(row=r, col=c) for r in range(3) for c in range(3)] + [_j(found=False, row=2, col=2)]
    assert diversity(judged, "position") == (9, pytest.approx(1.0))
    same = [_j(row=1, col=1)] * 5
    assert diversity(same, "position") == (1, 0.0)
    assert diversity([_j(found=False)], "color") == (0, 0.0)
    two = [_j(size=0), _j(size=1)]
    assert diversity(two, "size") == (2, pytest.approx(1.0))


def test_right_needs_an_object_and_every_named_attribute():
    spec = shapes.sample_attributes(3000, 0)
    lab = spec.labels()
    ok = _j(**lab)
    assert all(right(spec, ok, shapes.ATTRIBUTES).values())
    wrong_cell = _j(**{**lab, "col": (lab["col"] + 1) % 3})
    r = right(spec, wrong_cell, shapes.ATTRIBUTES)
    assert not r["position"] and r["color"] and r["shape"]
    assert not any(right(spec, _j(found=False, **lab), shapes.ATTRIBUTES).values())
