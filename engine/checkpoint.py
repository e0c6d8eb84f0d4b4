"""Checkpoints that are safe to write and exact to resume from.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target: a
crash or a full disk leaves the previous checkpoint in place, never a half-written one. Loads use
weights_only=True: a checkpoint is data, never code.
"""
from __future__ import annotations

import io
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint a user pointed at cannot be used; the message is one line that says what to do."""


_PROC_STATUS = "/proc/self/status"  # Linux >= 4.7 reports the umask here ("Umask:\t0022")


def process_umask(folder: str | os.PathLike) -> int:
    """The process umask, read without changing it. os.umask can only be read by setting it, and the set-
    and-restore pair leaves a window in which every other thread's new files get the wrong mode (0o666 for a
    writer that asked for private files). Linux says it in /proc; elsewhere a probe file created in `folder`
    with mode 0o777 comes out as 0o777 less the umask."""
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = os.path.join(folder, f".umask-probe.{os.getpid()}.{os.urandom(6).hex()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777)
    try:
        return 0o777 & ~os.fstat(fd).st_mode
    finally:
        os.close(fd)
        os.unlink(probe)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`: a crash
    leaves the previous file in place and no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask(path.parent))  # what open() would give; mkstemp's are 0o600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict(state), then each per-parameter tensor (Adam's moments) laid out as its parameter.

    load_state_dict keeps the saved strides, and the fused Adam kernels walk a parameter and its moments as
    if they had the same layout: a checkpoint written with --channels-last and resumed with
    --no-channels-last (or the reverse) paired the wrong elements without any error (PyTorch 2.14;
    tests/test_checkpoint_layout.py). Copying each moment into a tensor strided like its parameter fixes it.
    """
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, value in st.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list:
    """Every rank's RNG state (on every rank), so each rank continues its own stream after a resume."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    # Sent as torch.save bytes: all_gather_object cannot pickle tensors across processes reliably.
    buf = io.BytesIO()
    torch.save(mine, buf)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def _as_tuples(x):
    # random.setstate wants tuples; a round trip through the checkpoint may give lists.
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointManager:
    """latest.pt after every save, best.pt when the tracked metric improves, step_NNNNNNN.pt every
    `keep_every` steps (the `keep_last` newest of them are kept)."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(out_dir)
        self.keep_last = keep_last

    @property
    def latest(self) -> Path:
        return self.dir / "latest.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def save(self, state: dict, step: int, periodic: bool = False, best: bool = False) -> None:
        atomic_save(state, self.latest)
        if best:
            atomic_save(state, self.best)
        if periodic:
            atomic_save(state, self.dir / f"step_{step:07d}.pt")
            self._prune()

    def _prune(self) -> None:
        olds = sorted(p for p in self.dir.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name))
        for p in olds[: max(0, len(olds) - self.keep_last)]:
            p.unlink(missing_ok=True)

    def load_resume(self, resume: str | None, kind: str) -> dict | None:
        """The training state to continue from (--resume PATH|auto), or None; refuses a checkpoint of
        another kind or one without optimizer state (an exported model, say)."""
        path = self.resolve(resume)
        if path is None:
            return None
        state = load(path)
        if state.get("kind") != kind or not any(k.startswith("opt") for k in state):
            raise CheckpointError(f"{path} is a {state.get('kind', 'foreign')} checkpoint, not a "
                                  f"{kind.upper()} training checkpoint")
        return state

    def resolve(self, resume: str | None) -> Path | None:
        """--resume auto: latest.pt in the output folder if there is one; else the given path. A process an
        elastic agent or a Slurm requeue restarted resumes as with auto when no --resume was given."""
        if not resume:
            from engine.launch import is_restart

            if not is_restart():
                return None
            resume = "auto"
        if resume == "auto":
            return self.latest if self.latest.is_file() else None
        return Path(resume)


# ------------------------------------------------------------------------------------------ weights files
# Inference-only files (what pretrained/ ships): one safetensors file, the weights (half precision by
# default) and, as JSON in its metadata, the checkpoint's `kind`, its model config and any small extras
# (a CLIP's preprocessing, a GPT's conditioning options). No optimizer, no RNG, no pickle.

def save_weights(path: str | os.PathLike, kind: str, config: dict, state_dict: dict, *, extra: dict | None = None,
                 dtype: torch.dtype | None = torch.float16) -> None:
    """Write `state_dict` (floating tensors cast to `dtype`; None keeps them) atomically as safetensors."""
    import json

    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state_dict.items()}
    meta = {"kind": kind, "config": json.dumps(config), "extra": json.dumps(extra or {}),
            "format": "clipgen-open weights v1"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_weights(path: str | os.PathLike, map_location="cpu") -> dict:
    """{'kind', 'config', 'model', **extra} from a save_weights file; CheckpointError (one line) otherwise."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=device)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as safetensors ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file has no 'config' metadata; write it with "
                              "export.py (or engine.checkpoint.save_weights)")
    try:
        out = {**json.loads(meta.get("extra", "{}")), "kind": meta.get("kind"), "config": json.loads(meta["config"]),
               "model": tensors}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from None
    return out
