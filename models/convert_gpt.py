"""Load a GPT from our own checkpoints or from CLIP-GEN's ``gpt_*.pt``.

* **project**: ``{"kind": "gpt", "config": GPTConfig.to_dict(), "model": state_dict, ["ema": ...]}``
  (``train_gpt.py``); the EMA weights are preferred when present and ``use_ema``;
* **clipgen** (CLIP-GEN 97420d3): ``{"model": state_dict, "optimizer", ...}`` whose blocks are
  ``nn.TransformerEncoderLayer(norm_first=True)`` under ``blocks.N.encoder``; renamed here to ours. Its
  ``blocks.N.mask`` buffers (the causal mask) are dropped: our attention is causal by construction.

A CLIP-GEN file does not store its configuration; ``clipgen_gpt_config`` reads it from shapes. Two things
shapes cannot tell, and the rules used unless given explicitly:

* ``n_head``: ``max(4, n_embd // 64)``, i.e. GPT-2's 64-wide heads (gpt2-medium: 16 heads at width 1024,
  CLIP-GEN's COCO model) with at least 4 (the 4 heads of CLIP-GEN's small test config at width 64);
* ``n_tokens``: the largest square <= ``block_size`` (token grids are square; CLIP-GEN COCO stores
  block_size 256 for a 16x16 grid, its small config 17 for a 4x4 grid).

CLIP-GEN has no null condition for classifier-free guidance: ``null_prefix`` is taken from a freshly
initialised model (random), so the config says ``null_cond_trained=False`` (and ``origin="clipgen"``) and
sampling with ``cfg_scale != 1`` raises GuidanceError until the model is fine-tuned with condition dropout.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError
from models.convert import is_project, read_checkpoint, strict_load
from models.gpt import GPT, GPTConfig

_OWN_PARAMS = ("null_prefix",)  # ours only: filled from the fresh model when a checkpoint lacks them

_EXPECTED = ("expected a GPT checkpoint: ours (kind 'gpt' with 'config' and 'model', from train_gpt.py) "
             "or CLIP-GEN's gpt_*.pt ('model' holding 'blocks.0.encoder.self_attn.in_proj_weight')")


def detect_format(obj, path=None) -> str:
    """'project' or 'clipgen'; anything else raises CheckpointError (one line)."""
    where = f"{path}: " if path is not None else ""
    if is_project(obj, "gpt", where, _EXPECTED):
        return "project"
    model = obj.get("model")
    if isinstance(model, dict) and "blocks.0.encoder.self_attn.in_proj_weight" in model \
            and "cond_proj.weight" in model:
        return "clipgen"
    raise CheckpointError(f"{where}not a GPT checkpoint we know; {_EXPECTED}")


# ----------------------------------------------------------------------------------------------- CLIP-GEN

def default_n_head(n_embd: int) -> int:
    return max(4, n_embd // 64)


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise CheckpointError(f"state dict lacks {key!r}; it is not a complete CLIP-GEN GPT")
    return tuple(sd[key].shape)


def clipgen_gpt_config(state_dict: dict, n_head: int | None = None, n_tokens: int | None = None) -> GPTConfig:
    """Configuration of a CLIP-GEN GPT (its ``model`` state dict) from its shapes; see the module doc."""
    sd = state_dict
    vocab_size, n_embd = _shape(sd, "tok_emb.weight")
    block_size = _shape(sd, "pos_emb")[1]
    n_layer = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_head = n_head or default_n_head(n_embd)
    if n_embd % n_head:
        raise CheckpointError(f"width {n_embd} is not divisible by {n_head} heads; pass n_head= explicitly")
    n_tokens = n_tokens or math.isqrt(block_size) ** 2
    try:
        return GPTConfig(vocab_size=vocab_size, n_tokens=n_tokens, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, cond_dim=_shape(sd, "cond_proj.weight")[1], n_prefix=1, dropout=0.0,
                         block_size=block_size, null_cond_trained=False, origin="clipgen")
    except ValueError as e:
        raise CheckpointError(f"inconsistent CLIP-GEN GPT shapes: {e}") from None


_BLOCK_PARTS = (("self_attn.in_proj_weight", "attn.qkv.weight"), ("self_attn.in_proj_bias", "attn.qkv.bias"),
                ("self_attn.out_proj.weight", "attn.proj.weight"),
                ("self_attn.out_proj.bias", "attn.proj.bias"),
                ("linear1.weight", "mlp.fc.weight"), ("linear1.bias", "mlp.fc.bias"),
                ("linear2.weight", "mlp.proj.weight"), ("linear2.bias", "mlp.proj.bias"),
                ("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
                ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias"))
_TOP = {"pos_emb": "pos_emb", "tok_emb.weight": "tok_emb.weight", "cond_proj.weight": "cond_proj.weight",
        "cond_proj.bias": "cond_proj.bias", "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias",
        "head.weight": "head.weight", "head.bias": "head.bias"}


def convert_clipgen_gpt(state_dict: dict) -> dict:
    """CLIP-GEN -> our names. The tensors are the same: nn.MultiheadAttention's in_proj packs q, k, v as
    rows [q; k; v] and splits heads by contiguous columns, as our fused qkv Linear does."""
    parts = dict(_BLOCK_PARTS)
    out, left = {}, []
    for k, v in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.encoder\.(.+)", k)
        if k in _TOP:
            out[_TOP[k]] = v
        elif m and m.group(2) in parts:
            out[f"blocks.{m.group(1)}.{parts[m.group(2)]}"] = v
        elif not re.fullmatch(r"blocks\.\d+\.mask", k):  # the stored causal mask: ours is built in
            left.append(k)
    if left:
        raise CheckpointError(f"CLIP-GEN GPT state dict has {len(left)} keys this converter does not know "
                              f"(first: {left[0]!r}); it is not the GPT layout of CLIP-GEN 97420d3")
    return out


# ------------------------------------------------------------------------------------------------ loading

def project_config(obj: dict) -> GPTConfig:
    """The GPTConfig of one of our checkpoints or exported weights files. A config written before
    ``null_cond_trained`` existed takes it from the run's condition dropout, ``conditioning.cond_drop``
    (train_gpt.py stores it; export.py carries it into the file's metadata), and is True without one."""
    d = dict(obj["config"])
    cond = obj.get("conditioning")
    drop = cond.get("cond_drop") if isinstance(cond, dict) else None
    if "null_cond_trained" not in d and isinstance(drop, (int, float)):
        d["null_cond_trained"] = drop > 0
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"bad 'config' entry ({e})") from None


def load_state(model: GPT, state_dict: dict, *, assign: bool = False) -> GPT:
    """Strict load; only our own parameters (the null prefix) may be missing, taken from `model`."""
    return strict_load(model, state_dict, _OWN_PARAMS, assign=assign)


def _read(path: Path, map_location) -> dict:
    return read_checkpoint(path, map_location, what="GPT")  # the one reader: weights_only or safetensors


def load_gpt(path: str | os.PathLike, map_location="cpu", use_ema: bool = True, n_head: int | None = None,
             n_tokens: int | None = None, obj: dict | None = None) -> GPT:
    """A GPT in eval mode from our checkpoint or CLIP-GEN's (format detected from content). `n_head` and
    `n_tokens` are for CLIP-GEN files, which do not record them (see the module doc). `obj`: the file's
    content when the caller has already read it (models.flow.load_prior)."""
    path = Path(path)
    obj = _read(path, map_location) if obj is None else obj
    fmt = detect_format(obj, path)
    try:
        if fmt == "project":
            cfg = project_config(obj)
            sd = obj["ema"] if use_ema and isinstance(obj.get("ema"), dict) else obj["model"]
        else:
            cfg = clipgen_gpt_config(obj["model"], n_head=n_head, n_tokens=n_tokens)
            sd = convert_clipgen_gpt(obj["model"])
        model = load_state(GPT(cfg), sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


__all__ = ["CheckpointError", "detect_format", "default_n_head", "clipgen_gpt_config", "convert_clipgen_gpt",
           "load_state", "project_config", "load_gpt"]
