"""Checkpoints that are safe to write and exact to resume from.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target: a
crash or a full disk leaves the previous checkpoint in place, never a half-written one. Loads use
weights_only=True: a checkpoint is data, never code.
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import random
import re
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import UsageError, UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint a user pointed at cannot be used; the message is one line that says what to do."""


class DiskFullError(UserError):
    """A file could not be written for lack of space (or quota); the previous version of it is kept."""


# The disk's fault, not the program's: said in one line (their strerror), the previous file kept.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (an exception may have an empty message: EOFError of a 0-byte file)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


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


def _no_space(e: BaseException) -> int | None:
    """ENOSPC/EDQUOT when an OSError of them is anywhere in e's chain, else None: torch.save reports a failed
    write as a RuntimeError ("unexpected pos") whose context is the OSError, or the file's close raises
    the OSError with the RuntimeError as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if (code := _no_space(e)) is not None:
            raise DiskFullError(f"cannot write {path}: {os.strerror(code)} (the previous {path.name} is kept); "
                                "free some space and run again") from None
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
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(e)}") from None


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


LOCK_NAME = ".run.lock"  # in the output folder: held by the run writing there (OutDirLock)


class OutDirLock:
    """An exclusive lock on an output folder for the life of a run: two trainers on one folder would replace
    each other's latest.pt and best.pt. fcntl.flock on OUT/.run.lock, which the kernel releases when the
    process ends however it ends (a SIGKILL'd or crashed run leaves nothing held); the file keeps the
    holder's PID and host for the refusal message. The file itself is never removed: a run that opened it
    before the removal would lock a file no later run sees."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "OutDirLock":
        """Create the folder and take the lock; UsageError (one line) when the folder cannot be one or
        cannot be written, or another run holds it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--out-dir {self.folder} is a file, not a folder: pass a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # read-only, no permission, a file on the path
            raise UsageError(f"cannot write to --out-dir {self.folder}: {e.strerror or first_line(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "PID unknown"
            os.close(fd)
            raise UsageError(f"--out-dir {self.folder} is in use by another run ({holder}): wait for it to end, "
                             "stop it, or pass another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


class CheckpointManager:
    """latest.pt after every save, best.pt when the tracked metric improves, step_NNNNNNN.pt every
    `keep_every` steps (the `keep_last` newest of them are kept)."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(out_dir)
        self.keep_last = keep_last
        self.fallback_note: str | None = None  # set when --resume auto fell back from latest.pt (load_resume)

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
        olds = self.step_files()
        for p in olds[: max(0, len(olds) - self.keep_last)]:
            p.unlink(missing_ok=True)

    def step_files(self) -> list[Path]:
        """The folder's step_N.pt, oldest first."""
        return sorted(p for p in self.dir.glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name))

    def remove_stale_temps(self) -> tuple[int, int]:
        """Delete the temporaries (atomic_write's `.NAME.*.tmp`) that a killed run left: on a preemptible
        cluster they would fill the disk. Only under this folder's OutDirLock: another run's are live.
        Returns (files, bytes) removed."""
        n = size = 0
        for p in self.dir.glob(".*.tmp"):
            try:
                size += p.stat().st_size
                p.unlink()
                n += 1
            except FileNotFoundError:
                pass
        return n, size

    def load_resume(self, resume: str | None, kind: str) -> dict | None:
        """The training state to continue from (--resume PATH|auto), or None; refuses a checkpoint of
        another kind or one without optimizer state (an exported model, say). With auto (or a restart), an
        unreadable latest.pt falls back to the newest readable step_N.pt and says so in fallback_note."""
        path = self.resolve(resume)
        if path is None:
            return None
        try:
            state = load(path)
        except CheckpointError as e:
            if resume not in (None, "auto"):  # a path the user named: that one or nothing
                raise
            path, state = self._fallback(e)
        if not isinstance(state, dict) or state.get("kind") != kind or not any(k.startswith("opt") for k in state):
            what = state.get("kind", "foreign") if isinstance(state, dict) else "foreign"
            raise CheckpointError(f"{path} is a {what} checkpoint, not a {kind.upper()} training checkpoint")
        return state

    def _fallback(self, error: CheckpointError) -> tuple[Path, dict]:
        """The newest step_N.pt that loads, after latest.pt failed to (a truncated copy, a bad disk)."""
        for p in reversed(self.step_files()):
            try:
                state = load(p)
            except CheckpointError:
                continue
            self.fallback_note = f"{self.latest.name} is unreadable ({error}); resuming from {p.name} instead"
            return p, state
        raise CheckpointError(f"{error}; no step_*.pt in {self.dir} is readable either: fix or remove "
                              f"{self.latest.name}, or start afresh in another --out-dir") from None

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
    config, extra = _json_object(path, meta, "config", None), _json_object(path, meta, "extra", "{}")
    return {**extra, "kind": meta.get("kind"), "config": config, "model": tensors}


def _json_object(path: Path, meta: dict, key: str, default: str | None) -> dict:
    """meta[key] parsed as a JSON object; CheckpointError for anything else (another JSON value, text that
    is not JSON, nesting deep enough to exhaust the parser's recursion)."""
    import json

    try:
        value = json.loads(meta.get(key, default))
    except (json.JSONDecodeError, RecursionError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable '{key}' metadata ({first_line(e)[:200]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: its '{key}' metadata is a JSON {type(value).__name__}, not an object; "
                              "write the file with export.py (or engine.checkpoint.save_weights)")
    return value
