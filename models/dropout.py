"""Dropout with a cheaper mask on the CPU.

PyTorch's CPU dropout draws one Mersenne-Twister number per element (``bernoulli_``); with dropout 0.1 in the
8x512 GPT that was ~40% of a CPU training step (measured: bench/train_gpt.py, clipgen-size case). Here one
64-bit draw gives the keep/drop decisions of four elements, each from 16 random bits: element i is kept
when its 16-bit number is >= k, k = round(p * 65536), so the drop probability is k / 65536 (0.100006 for
0.1) and kept values are scaled by 65536 / (65536 - k), which keeps the expectation exact. Same generator
(``torch.manual_seed`` reproduces it); CUDA tensors use ``F.dropout`` (Philox, already cheap).

SDPA with ``dropout_p`` runs its math path on the CPU with the slow mask too, so CPU training with attention
dropout computes attention explicitly (``attention``); everywhere else it is one SDPA call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape: torch.Size | tuple, p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(bool mask of `shape`, True with probability 1 - k/65536; scale 65536 / (65536 - k)), k = round(p*65536)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = math.prod(shape)
    k = round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    bits.random_(-2 ** 63, None, generator=generator)           # the full 64-bit range: four 16-bit draws
    r = bits.view(torch.int16)[:n].view(shape)                   # uniform over [-32768, 32767]
    return r >= k - 32768, 65536 / (65536 - k)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with keep_mask's cheaper mask on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    mask, scale = keep_mask(x.shape, p, x.device)
    return x * mask.to(x.dtype) * scale


class Dropout(nn.Module):
    """nn.Dropout with `dropout`'s CPU mask; no parameters or buffers, so state dicts are unchanged."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention_with_dropout(q, k, v, p: float, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [causal]) with `dropout` on the weights, @ v: SDPA's math path, spelled out.
    The scale and the causal mask ride on one baddbmm (an additive -inf bias), not two more passes."""
    *lead, T, d = q.shape
    S = k.shape[-2]
    q3, k3 = q.reshape(-1, T, d), k.reshape(-1, S, d)
    scale = 1.0 / math.sqrt(d)
    if causal:
        bias = torch.zeros(T, S, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.ones(T, S, dtype=torch.bool, device=q.device).tril().logical_not_(), float("-inf"))
        att = torch.baddbmm(bias.expand(q3.shape[0], T, S), q3, k3.transpose(1, 2), alpha=scale)
    else:
        att = torch.bmm(q3, k3.transpose(1, 2)) * scale
    att = dropout(att.view(*lead, T, S).softmax(-1), p)
    return att.to(v.dtype) @ v


def attention(q, k, v, attn_mask=None, is_causal: bool = False, p: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention, except CPU attention with dropout (see the module doc)."""
    if p > 0.0 and q.device.type == "cpu" and attn_mask is None:
        return attention_with_dropout(q, k, v, p, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p)


__all__ = ["keep_mask", "dropout", "Dropout", "attention", "attention_with_dropout"]
