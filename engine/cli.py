"""Entry-point glue: user errors end in one line and a non-zero exit; bugs keep their traceback."""
from __future__ import annotations

import argparse
import os
import sys

from engine.errors import UsageError, UserError

__all__ = ["UsageError", "UserError", "add_run_args", "apply_defaults", "run", "user_errors"]


def user_errors() -> tuple:
    """Exception types that mean 'the user asked for something that cannot be done', not a bug: every error
    class of the project that means that subclasses engine.errors.UserError (so the engine imports none of
    the layers above it)."""
    return (UserError,)


def run(main, args) -> None:
    """main(args) with user errors as one line; under hfai (one process per node) in one process per GPU."""
    from engine import launch

    found = launch.detect()
    if found.kind == "hfai" and not os.environ.get(launch.SPAWNED_FLAG):
        launch.spawn_per_gpu(found, run, main, args)
        return
    try:
        main(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------- the trainers' flags

def add_run_args(parser: argparse.ArgumentParser, *, val_every: int, save_every: int, init_from: str | None = None,
                 compiles: str | None = None, val_batches: bool = False) -> argparse._ArgumentGroup:
    """The "run" flags every trainer has (engine.trainer.Run reads them); returns the group for the
    trainer's own. `init_from`: what --init-from accepts, for trainers that fine-tune; `compiles`: what
    --compile compiles, for trainers that can; `val_batches`: add --val-batches."""
    g = parser.add_argument_group("run")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUT_DIR/latest.pt")
    if init_from:
        g.add_argument("--init-from", default=None, metavar="PATH",
                       help=f"fine-tune from these weights: {init_from}. Weights only (the EMA's where the "
                            "file has one): the model config comes from the file, the optimizer and the step "
                            "count start afresh. A run that resumes (--resume, or a requeued/restarted job "
                            "finding OUT_DIR/latest.pt) continues its own checkpoint and ignores --init-from")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu (default: best available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast precision; auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(AMX/AVX512-BF16), fp32 elsewhere; fp16 (GPUs without bf16: V100, T4) scales the loss "
                        "with a GradScaler, which skips the steps whose gradients overflow and lowers its scale")
    g.add_argument("--num-workers", type=int, default=1)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--val-every", type=int, default=val_every)
    g.add_argument("--save-every", type=int, default=save_every)
    g.add_argument("--keep-every", type=int, default=10_000, help="also keep step_N.pt every N steps (0 = off)")
    g.add_argument("--no-tensorboard", action="store_true")
    if compiles:
        g.add_argument("--compile", action="store_true",
                       help=f"torch.compile {compiles} (one-off compile time; measured no faster on a CPU, see "
                            "README Performance)")
    if val_batches:
        g.add_argument("--val-batches", type=int, default=0, help="limit validation batches (0 = all)")
    return g


def apply_defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill the flags left at None with a preset's training defaults: a flag given on the command line wins."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args
