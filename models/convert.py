"""Load a VQGAN from our own checkpoints or from the two implementations users already hold weights for.

* **project**: ``{"kind": "vqgan", "config": VQGANConfig.to_dict(), "model": state_dict, ["ema": ...]}``
  (``train_vqgan.py``), or a ``.safetensors`` file whose metadata holds ``kind`` and ``config`` (JSON);
* **taming** (taming-transformers, Lightning): ``{"state_dict": ...}``; our module names are taming's, so
  only the training loss (``loss.*``) is dropped. The released ``last.ckpt`` files (Lightning 1.0.x) name
  Lightning's ModelCheckpoint class in their pickle: ``read_checkpoint`` lets exactly that through as an
  inert stand-in and refuses any other global, so they load without pytorch_lightning and run no code;
* **clipgen** (CLIP-GEN): ``{"model": ...}`` with flat ``nn.Sequential`` stacks, renamed here to taming's
  per-level names.

Neither foreign format stores its configuration, so ``taming_config`` / ``clipgen_config`` read it from
tensor shapes. The one thing weights cannot tell is the image resolution: they only say *which levels*
have attention. Rule: unless ``resolution=`` is given, the token grid is taken to be 16x16 (what CLIP-GEN
COCO and taming's f16 models use), i.e. ``resolution = 16 * 2**(len(ch_mult) - 1)``; ``attn_resolutions``
then holds ``resolution / 2**level`` for each level with attention, so the attention sits exactly where
the checkpoint has it whatever resolution is chosen (the network itself runs at any input size).

Imported models use a plain Euclidean code lookup (``l2_codes=False, restart_threshold=0``), as those
codes were trained.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from models.vqgan import VQGAN, VQGANConfig

DEFAULT_GRID = 16           # token grid side assumed when a foreign checkpoint's resolution is not given
TAMING_NORM_EPS = 1e-6      # taming's Normalize(): GroupNorm(32, eps=1e-6)
CLIPGEN_NORM_EPS = 1e-5     # CLIP-GEN: nn.GroupNorm's default; on its fixture 1e-6 is off by ~1e-3
_OWN_BUFFERS = ("quantize.usage", "quantize.n_updates")  # ours only: filled from a fresh model


from engine import checkpoint as ckpt  # noqa: E402
from engine.checkpoint import CheckpointError  # noqa: E402  (one error type for every checkpoint problem)


# ---------------------------------------------------------------------------------------------- formats

_EXPECTED = ("expected a VQGAN checkpoint: ours (kind 'vqgan' with 'config' and 'model'), CLIP-GEN's "
             "('model' holding 'quantizer.embedding.weight') or taming-transformers' ('state_dict' holding "
             "'quantize.embedding.weight')")


def is_project(obj, kind: str, where: str, expected: str) -> bool:
    """True for a complete checkpoint of ours of `kind` ('vqgan', 'gpt'); False for a dict without 'kind' (a
    foreign format, for the caller to recognise); CheckpointError (one line) for anything else."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}holds a {type(obj).__name__}, not a checkpoint dict; {expected}")
    if "kind" not in obj:
        return False
    name = kind.upper()
    if obj["kind"] != kind:
        raise CheckpointError(f"{where}is a {obj['kind']!r} checkpoint, not a {name} one; pass the {name} "
                              f"checkpoint (kind '{kind}', written by train_{kind}.py) instead")
    if not isinstance(obj.get("config"), dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{where}is a {name} checkpoint without 'config' and 'model' entries; it is "
                              f"incomplete, pass a checkpoint written by train_{kind}.py")
    return True


def detect_format(obj, path=None) -> str:
    """'project', 'clipgen' or 'taming'; anything else raises CheckpointError (one line)."""
    where = f"{path}: " if path is not None else ""
    if is_project(obj, "vqgan", where, _EXPECTED):
        return "project"
    model = obj.get("model")
    if isinstance(model, dict) and "quantizer.embedding.weight" in model \
            and "encoder.down.0.block.0.weight" in model:
        return "clipgen"
    sd = obj.get("state_dict")
    if isinstance(sd, dict) and "quantize.embedding.weight" in sd and "encoder.conv_in.weight" in sd:
        return "taming"
    raise CheckpointError(f"{where}not a VQGAN checkpoint we know; {_EXPECTED}")


# ----------------------------------------------------------------------------------- configs from shapes

def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise CheckpointError(f"state dict lacks {key!r}; it is not a complete VQGAN of this layout")
    return tuple(sd[key].shape)


def _resolution_and_attn(n_levels: int, attn_levels: list, resolution) -> tuple:
    factor = 2 ** (n_levels - 1)
    if resolution is None:
        resolution = DEFAULT_GRID * factor
    if resolution <= 0 or resolution % factor:
        raise CheckpointError(f"resolution {resolution} is not a positive multiple of the model's "
                              f"downsampling factor {factor}; pass resolution=k*{factor}")
    return resolution, tuple(resolution // 2 ** i for i in attn_levels)


def _foreign_config(*, resolution, n_levels, attn_levels, **fields) -> VQGANConfig:
    resolution, attn = _resolution_and_attn(n_levels, attn_levels, resolution)
    return VQGANConfig(resolution=resolution, attn_resolutions=attn, dropout=0.0, l2_codes=False,
                       restart_threshold=0.0, **fields)


def _count(sd: dict, prefix: str) -> int:
    """Number of consecutive children 0, 1, ... under `prefix.`."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def _mult(out_ch: int, ch: int) -> int:
    if out_ch % ch:
        raise CheckpointError(f"a level has {out_ch} channels, not a multiple of the base width {ch}")
    return out_ch // ch


def taming_config(state_dict: dict, resolution: int | None = None) -> VQGANConfig:
    """Configuration of a taming-transformers VQGAN (``loss.*`` keys may be present) from its shapes."""
    sd = state_dict
    ch = _shape(sd, "encoder.conv_in.weight")[0]
    n_levels = _count(sd, "encoder.down")
    if n_levels == 0:
        raise CheckpointError("state dict has no 'encoder.down.0' level; not a taming VQGAN")
    n_res = _count(sd, "encoder.down.0.block")
    ch_mult = tuple(_mult(_shape(sd, f"encoder.down.{i}.block.0.conv2.weight")[0], ch)
                    for i in range(n_levels))
    attn_levels = [i for i in range(n_levels) if f"encoder.down.{i}.attn.0.norm.weight" in sd]
    return _foreign_config(
        resolution=resolution, n_levels=n_levels, attn_levels=attn_levels,
        in_channels=_shape(sd, "encoder.conv_in.weight")[1],
        out_channels=_shape(sd, "decoder.conv_out.weight")[0],
        ch=ch, ch_mult=ch_mult, num_res_blocks=n_res, z_channels=_shape(sd, "decoder.conv_in.weight")[1],
        embed_dim=_shape(sd, "quant_conv.weight")[0], n_codes=_shape(sd, "quantize.embedding.weight")[0],
        norm_eps=TAMING_NORM_EPS)


def _clipgen_stack(sd: dict, prefix: str) -> list:
    """A flat CLIP-GEN nn.Sequential -> levels, each {"res": [idx], "attn": [idx], "resample": idx|None}."""
    idx = sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in sd if k.startswith(prefix + ".")})
    levels = [{"res": [], "attn": [], "resample": None}]
    for i in idx:
        p = f"{prefix}.{i}"
        if f"{p}.block.0.weight" in sd:
            levels[-1]["res"].append(i)
        elif f"{p}.attn.in_proj_weight" in sd:
            levels[-1]["attn"].append(i)
        elif f"{p}.conv.weight" in sd:  # down- or upsample: closes the level
            levels[-1]["resample"] = i
            levels.append({"res": [], "attn": [], "resample": None})
        else:
            raise CheckpointError(f"unrecognised CLIP-GEN layer {p!r}; expected a residual block, an "
                                  "attention block or a resampling conv")
    return levels


def clipgen_config(state_dict: dict, resolution: int | None = None) -> VQGANConfig:
    """Configuration of a CLIP-GEN VQGAN (its ``model`` state dict) from its shapes."""
    sd = state_dict
    ch = _shape(sd, "encoder.conv_in.weight")[0]
    levels = _clipgen_stack(sd, "encoder.down")
    n_res = len(levels[0]["res"])
    if any(len(lv["res"]) != n_res for lv in levels):
        raise CheckpointError("CLIP-GEN encoder levels hold different numbers of residual blocks")
    ch_mult = tuple(_mult(_shape(sd, f"encoder.down.{lv['res'][0]}.block.6.weight")[0], ch)
                    for lv in levels)
    return _foreign_config(
        resolution=resolution, n_levels=len(levels),
        attn_levels=[i for i, lv in enumerate(levels) if lv["attn"]],
        in_channels=_shape(sd, "encoder.conv_in.weight")[1],
        out_channels=_shape(sd, "decoder.final.2.weight")[0],
        ch=ch, ch_mult=ch_mult, num_res_blocks=n_res, z_channels=_shape(sd, "encoder.final.2.weight")[0],
        embed_dim=_shape(sd, "encoder.final.3.weight")[0],
        n_codes=_shape(sd, "quantizer.embedding.weight")[0],
        norm_eps=CLIPGEN_NORM_EPS)


# ------------------------------------------------------------------------------------ state-dict renames

def convert_taming(state_dict: dict) -> dict:
    """taming-transformers -> ours: the names already match; the training loss's weights are dropped."""
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


_RES_PARTS = (("block.0", "norm1"), ("block.2", "conv1"), ("block.3", "norm2"), ("block.6", "conv2"),
              ("shortcut", "nin_shortcut"))  # Sequential(norm, SiLU, conv, norm, SiLU, dropout, conv)


def convert_clipgen(state_dict: dict) -> dict:
    """CLIP-GEN -> ours (taming's names); ``discriminator.*`` is dropped, any other unknown key raises."""
    sd, out, used = state_dict, {}, set()

    def move(src: str, dst: str, fn=lambda t: t):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = fn(sd[f"{src}.{p}"])
                used.add(f"{src}.{p}")

    def res(src: str, dst: str):
        for a, b in _RES_PARTS:
            move(f"{src}.{a}", f"{dst}.{b}")

    def attn(src: str, dst: str):
        # nn.MultiheadAttention (one head) packs q, k, v as rows of in_proj (3C, C); taming has 1x1 convs.
        move(f"{src}.norm", f"{dst}.norm")
        w, b = sd[f"{src}.attn.in_proj_weight"], sd[f"{src}.attn.in_proj_bias"]
        used.update((f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias"))
        C = w.shape[1]
        for name, wi, bi in zip(("q", "k", "v"), w.chunk(3), b.chunk(3)):
            out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = wi.reshape(C, C, 1, 1), bi
        move(f"{src}.attn.out_proj", f"{dst}.proj_out",
             lambda t: t.reshape(C, C, 1, 1) if t.dim() == 2 else t)  # weight (C, C) -> 1x1 conv; bias as is

    def stack(prefix: str, dst: str, levels: list, order: list, resample: str):
        for level, lv in zip(order, levels):
            for j, i in enumerate(lv["res"]):
                res(f"{prefix}.{i}", f"{dst}.{level}.block.{j}")
            for j, i in enumerate(lv["attn"]):
                attn(f"{prefix}.{i}", f"{dst}.{level}.attn.{j}")
            if lv["resample"] is not None:
                move(f"{prefix}.{lv['resample']}.conv", f"{dst}.{level}.{resample}.conv")

    def mid(prefix: str, dst: str):
        res(f"{prefix}.0", f"{dst}.block_1")
        attn(f"{prefix}.1", f"{dst}.attn_1")
        res(f"{prefix}.2", f"{dst}.block_2")

    try:
        down = _clipgen_stack(sd, "encoder.down")
        up = _clipgen_stack(sd, "decoder.up")  # deepest level first
        move("encoder.conv_in", "encoder.conv_in")
        stack("encoder.down", "encoder.down", down, list(range(len(down))), "downsample")
        mid("encoder.mid", "encoder.mid")
        move("encoder.final.0", "encoder.norm_out")
        move("encoder.final.2", "encoder.conv_out")
        move("encoder.final.3", "quant_conv")  # CLIP-GEN's last 1x1 encoder conv is taming's quant_conv
        move("decoder.quant_conv_in", "post_quant_conv")
        move("decoder.conv_in", "decoder.conv_in")
        mid("decoder.mid", "decoder.mid")
        stack("decoder.up", "decoder.up", up, list(reversed(range(len(up)))), "upsample")
        move("decoder.final.0", "decoder.norm_out")
        move("decoder.final.2", "decoder.conv_out")
        move("quantizer.embedding", "quantize.embedding")
    except KeyError as e:
        raise CheckpointError(f"CLIP-GEN state dict lacks {e.args[0]!r}; not a complete VQGAN") from None
    left = sorted(k for k in sd if k not in used and not k.startswith("discriminator."))
    if left:
        raise CheckpointError(f"CLIP-GEN state dict has {len(left)} keys this converter does not know "
                              f"(first: {left[0]!r}); it is not the VQGAN layout of CLIP-GEN 97420d3")
    return out


# ------------------------------------------------------------------------------------------------ loading

def load_state(model: VQGAN, state_dict: dict, *, assign: bool = False) -> VQGAN:
    """Strict load; only our own quantizer buffers (usage counters) may be missing, taken from `model`."""
    return strict_load(model, state_dict, _OWN_BUFFERS, assign=assign)


def strict_load(model: torch.nn.Module, state_dict: dict, own: tuple = (), *, assign: bool = False):
    """load_state_dict(strict=True) where the entries named in `own` (ours only, absent from foreign files)
    may be missing and are taken from `model`; a mismatch is one CheckpointError line, not the key lists."""
    mine = model.state_dict(keep_vars=False)
    sd = dict(state_dict)
    for k in own:
        sd.setdefault(k, mine[k])
    try:
        model.load_state_dict(sd, strict=True, assign=assign)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches: one line, not the full list
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"weights do not fit the model built from its config: {msg}") from None
    return model


# PyTorch Lightning 1.0.x (taming-transformers' released checkpoints) keys its `callbacks` dict by the
# callback *class*, so the pickle holds a GLOBAL that weights_only refuses. These are exactly the Lightning
# globals such files carry; each is let through as an inert stand-in (never imported, nothing runs) and
# only for the duration of one load. Any other global is refused with one line.
class _LightningStandIn:
    """Takes the place of a Lightning class named in a checkpoint; holds no behaviour."""

    def __init__(self, *args, **kwargs):
        pass


LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
_STAND_INS = {name: type(name.rsplit(".", 1)[1], (_LightningStandIn,), {"qualified_name": name})
              for name in LIGHTNING_GLOBALS}


def _plain_callbacks(obj):
    """A Lightning `callbacks` dict keyed by stand-in classes -> keyed by their qualified names (str), so
    what the reader returns holds no stand-in and saves/loads like any plain checkpoint."""
    cb = obj.get("callbacks") if isinstance(obj, dict) else None
    if isinstance(cb, dict):
        obj["callbacks"] = {k.qualified_name if isinstance(k, type) and issubclass(k, _LightningStandIn)
                            else k: v for k, v in cb.items()}
    return obj


def _refused_global(e: Exception) -> str | None:
    """The global torch's weights_only unpickler refused to import, from its message; None otherwise."""
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(e))
    return m.group(1) if m else None


def read_checkpoint(path: str | os.PathLike, map_location="cpu", what: str = "VQGAN") -> dict:
    """The object in a checkpoint file, read without running pickled code: .safetensors through
    engine.checkpoint.read_weights; anything else (.pt, .ckpt) with torch.load(weights_only=True), the
    Lightning globals above allowed as stand-ins. Every failure is a one-line CheckpointError naming the
    file; `what` names the expected model in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint not found: {path}; pass the path of a .pt, .ckpt or "
                              ".safetensors file")
    if path.suffix == ".safetensors":
        return ckpt.read_weights(path, map_location)
    try:
        with torch.serialization.safe_globals([(c, n) for n, c in _STAND_INS.items()]):
            return _plain_callbacks(torch.load(path, map_location=map_location, weights_only=True))
    except Exception as e:  # truncated, foreign or not a checkpoint at all: say which file, not a traceback
        name = _refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if name is not None:
            raise CheckpointError(f"{path}: refused: its pickle names the Python global {name!r}, and loading "
                                  "it would import and run code; only tensors, plain containers and Lightning's "
                                  f"{', '.join(LIGHTNING_GLOBALS)} are allowed (re-save the weights as a plain "
                                  "state dict or .safetensors)") from None
        # torch wraps an unpickler's reason in advice to retry with weights_only=False: keep the reason only
        m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        first = m.group(1) if m else (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {first[:200]}); check that it is a "
                              f"complete, uncorrupted {what} checkpoint") from None


def load_vqgan(path: str | os.PathLike, *, use_ema: bool = True, resolution: int | None = None,
               map_location="cpu") -> VQGAN:
    """A VQGAN in eval mode from our checkpoint (EMA weights preferred when `use_ema`), a CLIP-GEN or a
    taming-transformers one. `resolution` is for the foreign formats, which do not record it (see the
    module docstring); a project checkpoint's config already holds it."""
    path = Path(path)
    obj = read_checkpoint(path, map_location, what="VQGAN")
    if path.suffix == ".safetensors":
        obj["kind"] = obj.get("kind") or "vqgan"  # exports from before 'kind' was written hold a VQGAN
    fmt = detect_format(obj, path)
    try:
        if fmt == "project":
            try:
                cfg = VQGANConfig.from_dict(obj["config"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"bad 'config' entry ({e})") from None
            sd = obj["ema"] if use_ema and isinstance(obj.get("ema"), dict) else obj["model"]
        elif fmt == "clipgen":
            cfg, sd = clipgen_config(obj["model"], resolution), convert_clipgen(obj["model"])
        else:
            cfg, sd = taming_config(obj["state_dict"], resolution), convert_taming(obj["state_dict"])
        model = load_state(VQGAN(cfg), sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


__all__ = ["CheckpointError", "read_checkpoint", "is_project", "strict_load", "LIGHTNING_GLOBALS", "detect_format", "taming_config", "clipgen_config", "convert_taming",
           "convert_clipgen", "load_state", "load_vqgan", "DEFAULT_GRID"]
