"""Turn a training checkpoint into an inference-only weights file (what pretrained/ ships).

    python export.py runs/gpt-tiny/best.pt pretrained/shapes/gpt.safetensors

Reads a train_vqgan.py, train_gpt.py (GPT or --model flow) or train_clip.py checkpoint, keeps its EMA weights (the ones the
loaders use; --no-ema for the raw ones), drops the optimizer, RNG and discriminator, casts floating
tensors to --dtype (fp16 by default: half the size, and the loaders compute in float32 from it) and writes
one safetensors file whose metadata holds the kind, the model config and small extras (a CLIP's pixel
normalisation, a GPT's conditioning options). Every loader of the project (load_vqgan, load_gpt,
load_clip, demo.py, evaluate.py) accepts the result wherever it accepts the checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.cli import Parser, UsageError, at_least, run

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt checkpoint written by one of the trainers")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="floating-point storage type")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--flow-steps", type=at_least(0), default=None,
                   help="a flow prior: the ODE steps it samples with by default (default: as trained)")
    p.add_argument("--flow-solver", choices=["euler", "heun"], default=None,
                   help="a flow prior: its default ODE solver (default: as trained)")
    return p.parse_args(argv)


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
           use_ema: bool = True, flow_sampling: dict | None = None) -> dict:
    """Write the weights file; returns {'kind', 'params', 'bytes'}. flow_sampling: {'steps': N, 'solver': S}
    (either may be left out) replaces a flow prior's default sampling settings."""
    if Path(out).suffix != ".safetensors":
        raise UsageError(f"{out}: the output must end in .safetensors")
    state = ckpt.load(checkpoint)
    if not isinstance(state, dict) or state.get("kind") not in ("vqgan", "gpt", "flow", "clip"):
        raise UsageError(f"{checkpoint} is not a checkpoint of this project's trainers (no kind vqgan/gpt/flow/clip)")
    kind = state["kind"]
    weights = state["ema"] if use_ema and isinstance(state.get("ema"), dict) else state["model"]
    extra = {}
    if kind == "clip":
        config = state["open_clip_config"]
        if "preprocess" in state:
            extra["preprocess"] = {k: list(v) for k, v in state["preprocess"].items()}
    else:
        config = state["config"]
    if flow_sampling:
        if kind != "flow":
            raise UsageError(f"--flow-steps and --flow-solver are for a flow prior; {checkpoint} is a {kind}")
        config = {**config, **flow_sampling}
    if kind in ("gpt", "flow") and "conditioning" in state:
        extra["conditioning"] = state["conditioning"]
    extra["source"] = {"checkpoint": Path(checkpoint).name, "step": state.get("step"), "ema": weights is state.get("ema")}
    ckpt.save_weights(out, kind, config, weights, extra=extra, dtype=dtype)
    n = sum(v.numel() for v in weights.values() if v.is_floating_point())
    return {"kind": kind, "params": n, "bytes": Path(out).stat().st_size}


def main(args) -> None:
    sampling = {k: v for k, v in (("steps", args.flow_steps), ("solver", args.flow_solver)) if v is not None}
    info = export(args.checkpoint, args.out, DTYPES[args.dtype], use_ema=not args.no_ema, flow_sampling=sampling)
    print(f"{args.out}: {info['kind']}, {info['params'] / 1e6:.2f}M parameters in {args.dtype}, "
          f"{info['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    run(main, parse_args())
