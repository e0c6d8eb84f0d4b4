"""Linear layers whose weights are prepacked for oneDNN when they run on few rows on a CPU: the decode step.

A KV-cache decode step multiplies every weight matrix by a handful of rows (batch x 1 token). MKL's GEMM
behind ``F.linear`` reads the weights of such thin products far below the machine's bandwidth (the
512 -> 16384 vocabulary head of the 8x512 GPT: 4.9-14 ms for 8 rows, ``bench/decode_step.py``); oneDNN with
its weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what
``torch.compile``'s freezing pass does for CPU linears) runs the same product about 3x faster (1.7-4.4 ms).
Results agree with ``F.linear`` to float rounding (~1e-6 relative).

``Linear`` is an ``nn.Linear`` (same parameters, same state dict) that takes the packed path only when all
of these hold: its weight was packed by ``pack_linears`` and has not changed since (the weight's identity
and version counter are checked at every call, so an optimiser step or a load silently falls back), grads
are off, autocast is off, the input is on the CPU in the packed dtype and has at most ``MAX_ROWS`` rows
(a prefill of many rows is as fast through MKL). Everything else, training included, is ``F.linear``.

The packed copies live in a registry keyed by the weight, not on the module: oneDNN's opaque tensors
cannot be deep-copied or pickled, and a copy of a module must stay a plain copy (its own weights are
unpacked until it is packed itself). They cost one more copy of the weights' memory while the weights live.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 256  # packed path up to this many rows per call (batch x tokens); above, MKL is as fast

# id(weight) -> (weak reference to the weight, packed weight, the weight's version when it was packed)
_PACKED: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}
_SUPPORTED: dict[torch.dtype, bool] = {}


def supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU (float32 where oneDNN is built in; bfloat16 only
    on CPUs with the instructions oneDNN needs: asked once by packing a tiny weight)."""
    if dtype not in _SUPPORTED:
        ok = torch.backends.mkldnn.is_available()
        if ok:
            try:
                torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
            except (RuntimeError, NotImplementedError):
                ok = False
        _SUPPORTED[dtype] = ok
    return _SUPPORTED[dtype]


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _PACKED.get(id(weight))
    if entry is None:
        return None
    ref, packed, version = entry
    return packed if ref() is weight and version == weight._version else None


class Linear(nn.Linear):
    """nn.Linear with a prepacked oneDNN path for few-row CPU inference (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _PACKED and not torch.is_grad_enabled() and x.device.type == "cpu" \
                and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu"):
            packed = _packed(self.weight)
            if packed is not None and packed.dtype == x.dtype:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _forget(key: int):
    def drop(_ref):
        _PACKED.pop(key, None)
    return drop


@torch.no_grad()
def pack_linears(module: nn.Module, rows: int) -> int:
    """Pack the weight of every ``Linear`` in `module` that lives on the CPU in a supported dtype and is not
    packed already (or changed since); `rows` is the expected rows per call (oneDNN's layout hint).
    Returns how many weights it packed now. Cheap when nothing changed (a dictionary look-up per layer)."""
    done = 0
    for m in module.modules():
        if not isinstance(m, Linear):
            continue
        w = m.weight
        if w.device.type != "cpu" or not supported(w.dtype) or _packed(w) is not None:
            continue
        key = id(w)
        _PACKED[key] = (weakref.ref(w, _forget(key)), torch.ops.mkldnn._reorder_linear_weight(w.detach(),
                                                                                              max(rows, 1)),
                        w._version)
        done += 1
    return done


def unpack_linears(module: nn.Module) -> None:
    """Drop the packed copies of `module`'s weights (their memory); calls take F.linear again."""
    for m in module.modules():
        if isinstance(m, Linear):
            _PACKED.pop(id(m.weight), None)


__all__ = ["Linear", "MAX_ROWS", "pack_linears", "supported", "unpack_linears"]
