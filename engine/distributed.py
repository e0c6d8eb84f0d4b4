"""One process or many: read the launcher's environment, pick the device, set up the process group.

Which launcher (plain python, torchrun, Slurm srun, hfai) and which rank: engine/launch.py decides, by the
rules written there. With more than one process the process joins a group: NCCL when it runs on CUDA,
gloo otherwise. Else it runs alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import UsageError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The best device there is unless one is asked for: CUDA (this rank's GPU), then MPS, then CPU."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


TRAINING_DEVICES = ("cpu", "cuda", "mps")


def checked_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """pick_device, refusing (one-line UsageError) a --device that is no device, one this machine does not
    have (CUDA without a GPU, a GPU index past the last, MPS off a Mac) or one nothing can train on (meta)."""
    try:
        device = pick_device(requested, local_rank)
    except RuntimeError:  # torch.device's "Expected one of cpu, cuda, ..."
        raise UsageError(f"--device {requested} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in TRAINING_DEVICES:
        raise UsageError(f"--device {requested}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {requested}: MPS is not available here; use --device cpu (or auto)")
    return device


def cpu_has_fast_bf16() -> bool:
    """True where bf16 autocast is measured faster than fp32 on the CPU: Intel AMX (the Shapes VQGAN about
    1.6x faster). AVX512-BF16 alone is not enough: on a 2-core Intel Xeon with it but no AMX, bf16 autocast
    trained the scenes GPT 2.4x and the scenes VQGAN 1.3x slower than fp32 (README, Performance)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision auto|bf16|fp16|fp32 -> the autocast dtype, None for fp32. auto: bf16 on CUDA and on CPUs
    with AMX, fp32 elsewhere (MPS, older CPUs). fp16 is for GPUs without bf16 (V100, T4); training in
    it needs loss scaling (engine.trainer.Precision)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def fused_optimizer(device: torch.device) -> bool:
    """Whether Adam/AdamW take fused=True on `device`: PyTorch has fused kernels for CUDA and CPU (one pass
    over each parameter instead of the foreach path's several; 0.18 -> 0.07 s per step for the 8x512 GPT on
    the 2-core CPU, bench/train_gpt.py); other devices keep the default."""
    return device.type in ("cuda", "cpu")


def setup(requested_device: str | None = None) -> DistEnv:
    from engine import launch as L

    found = L.detect()
    if found.distributed:
        L.export_env(found)  # Slurm's variables as torchrun's, for the env:// rendezvous
    world_size, rank, local_rank = found.world_size, found.rank, found.local_rank
    device = checked_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on one (a stop request must stop all ranks at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank seed: ranks draw different dropout masks and noise, yet a rerun draws the same ones."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
