"""Entry-point glue: user errors end in one line and a non-zero exit; bugs keep their traceback."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

from engine.errors import UsageError, UserError

__all__ = ["Parser", "UsageError", "UserError", "add_run_args", "apply_defaults", "at_least", "check_sampling_numbers",
           "fraction", "message_line",
           "non_negative_float", "run", "user_errors"]


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
        print(f"error: {message_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def message_line(e: BaseException) -> str:
    """A user error's one line. A DataLoader worker's error reaches the main process re-raised with
    "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ..." as its message, whose last
    line is the original `module.Type: message`: that message is the line."""
    text = str(e).strip()
    if "\nOriginal Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes in one `error:` line (exit 2), as every other mistake, not its usage block."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def check_sampling_numbers(args, seed_scale: int = 1) -> None:
    """demo.py's and evaluate.py's sampling flags (those present on args; None = unset): --temperature > 0,
    --top-k >= 1, --top-p in (0, 1], a finite --cfg-scale, a --seed a generator takes (seed_scale: how much
    the script multiplies it by)."""
    t, k, top_p, cfg = (getattr(args, n, None) for n in ("temperature", "top_k", "top_p", "cfg_scale"))
    if t is not None and not (math.isfinite(t) and t > 0):
        raise UsageError(f"--temperature must be a number > 0, got {t} (use --top-k 1 for greedy)")
    if k is not None and k < 1:
        raise UsageError(f"--top-k must be at least 1, got {k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if cfg is not None and not math.isfinite(cfg):
        raise UsageError(f"--cfg-scale must be a finite number, got {cfg}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63 // (seed_scale * 2):
        raise UsageError(f"--seed must be between 0 and {2**63 // (seed_scale * 2) - 1}, got {seed}")


# ------------------------------------------------------------------------------------ numbers on the flags
# argparse types: a bad number ends in argparse's one `error:` line (exit 2), before anything starts.

def at_least(low: int):
    """An int flag of at least `low`."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    convert.__name__ = f"int >= {low}"
    return convert


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (a learning rate, a weight, a clipping norm; 0 = off)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1) (an EMA decay, a dropout probability)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def share(text: str) -> float:
    """A float in [0, 1] (a share of the items, where all of them is meaningful)."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


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
    g.add_argument("--num-workers", type=at_least(0), default=1)
    g.add_argument("--log-every", type=at_least(0), default=50, help="steps between log lines (0 = only at the end)")
    g.add_argument("--val-every", type=at_least(0), default=val_every,
                   help="steps between validations (0 = only at the end)")
    g.add_argument("--save-every", type=at_least(1), default=save_every,
                   help="steps between saves of latest.pt (a stop signal and the end save too)")
    g.add_argument("--keep-every", type=at_least(0), default=10_000,
                   help="also keep step_N.pt every N steps (0 = off)")
    g.add_argument("--no-tensorboard", action="store_true")
    if compiles:
        g.add_argument("--compile", action="store_true",
                       help=f"torch.compile {compiles} (one-off compile time; measured no faster on a CPU, see "
                            "README Performance)")
    if val_batches:
        g.add_argument("--val-batches", type=at_least(0), default=0, help="limit validation batches (0 = all)")
    return g


def apply_defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """Fill the flags left at None with a preset's training defaults: a flag given on the command line wins."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args
