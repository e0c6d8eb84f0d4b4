"""One judgement for "N processes train what one process trains": two state dicts compared tensor by tensor.

A check over all elements at once (the share of differing elements in the concatenation of every tensor)
lets a sync bug confined to one small tensor pass: a LayerNorm bias, the GPT's null prefix or a GroupNorm
weight is a few hundred elements among millions. Here each tensor is judged on its own:

- every element within `bound` (what Adam can move an element in the run: the summed learning rate, as a
  step is at most about lr per element, whatever the gradient);
- at most `max_share` of a tensor's elements beyond `tol` (float summation order). Adam turns a gradient
  that is nearly zero into a step of up to lr, so float noise flips the odd element of a weight: in
  test_train_vqgan's run at most 0.8% of any discriminator tensor (2 of a GroupNorm weight's 256), none of
  the VQGAN's or the GPT's. A tensor whose all-reduce is skipped differs in 25-97% of its elements
  (measured: see tests/test_compare.py), so the default 5% tells them apart with room on both sides;
- elements that `noise_only` marks carry a gradient that is zero up to float noise by construction (an
  attention key bias: adding one vector to every key shifts each query's scores by a constant, which the
  softmax cancels). Adam scales that noise up to steps of any size up to lr, in every element of the
  tensor at once, so only `bound` holds there. The GPT's key biases differ 100 times more than its other
  biases in test_train_gpt's run (9e-7 against 1e-8), still within `tol` on this machine.

Integer tensors (counters) must be equal."""
from __future__ import annotations

import re
from typing import Callable

import torch

NoiseOnly = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def attention_key_biases(key: str, t: torch.Tensor) -> torch.Tensor | None:
    """The softmax-invariant elements of this project's models: a bool mask shaped like t, or None.

    GPT: `blocks.N.attn.qkv.bias` is (3C,) = [q | k | v], the middle third is the key bias.
    VQGAN: `...attn....k.bias` (C,) of the spatial self-attention blocks.
    open_clip (CLIP): `...attn.in_proj_bias` (3C,) laid out as the GPT's."""
    if key.endswith(("attn.qkv.bias", "attn.in_proj_bias")):
        mask = torch.zeros(t.shape, dtype=torch.bool)
        c = t.shape[0] // 3
        mask[c:2 * c] = True
        return mask
    if re.search(r"attn(_\d+|\.\d+)\.k\.bias$", key):
        return torch.ones(t.shape, dtype=torch.bool)
    return None


def compare_states(a: dict, b: dict, *, bound: float, tol: float = 1e-5, max_share: float = 0.05,
                   noise_only: NoiseOnly | None = attention_key_biases) -> list[str]:
    """What differs between two state dicts beyond the tolerances above, one line per tensor ([] = equal)."""
    problems = []
    if set(a) != set(b):
        return [f"keys differ: only in a {sorted(set(a) - set(b))}, only in b {sorted(set(b) - set(a))}"]
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape:
            problems.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if not x.is_floating_point():
            if not torch.equal(x, y):
                problems.append(f"{k}: integer tensors differ")
            continue
        diff = (x.float() - y.float()).abs()
        if diff.numel() == 0:
            continue
        worst = diff.max().item()
        if not worst <= bound:  # also catches NaN
            problems.append(f"{k} {tuple(x.shape)}: max |diff| {worst:.3g} > bound {bound:.3g}")
            continue
        free = noise_only(k, x) if noise_only else None
        judged = diff if free is None else diff[~free]
        if judged.numel() == 0:
            continue
        n_off = int((judged > tol).sum())
        if n_off > max_share * judged.numel():
            problems.append(f"{k} {tuple(x.shape)}: {n_off} of {judged.numel()} elements differ by more than "
                            f"{tol:.3g} (allowed {max_share:.1%}; max {judged.max().item():.3g})")
    return problems


def assert_states_match(a: dict, b: dict, what: str = "", **tolerances) -> None:
    problems = compare_states(a, b, **tolerances)
    assert not problems, f"{what}: {len(problems)} tensor(s) differ:\n" + "\n".join(problems[:20])
