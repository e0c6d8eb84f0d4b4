"""DataLoaders the trainers share: a resumable, rank-sliced training stream and a rank-sharded val set."""
from __future__ import annotations

import signal

import torch

from engine.distributed import DistEnv
from engine.sampler import ResumableBatchSampler


def _ignore_stop_signals(worker_id: int) -> None:
    # A scheduler (Slurm, `timeout`) may signal the whole process group: the workers must keep serving
    # batches while the main process finishes its step and saves, not die and crash it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def loader_options(env: DistEnv, num_workers: int) -> dict:
    # A private generator: otherwise every new iterator draws its worker seed from the global RNG, and a
    # resumed run (one iterator fewer or more) would continue with a shifted dropout/noise stream.
    opts = dict(num_workers=num_workers, pin_memory=env.device.type == "cuda",
                generator=torch.Generator().manual_seed(env.rank))
    if num_workers > 0:
        opts["prefetch_factor"] = 4
        opts["worker_init_fn"] = _ignore_stop_signals
    return opts


def train_loader(dataset, global_batch: int, env: DistEnv, seed: int, start_step: int, num_workers: int,
                 collate_fn=None):
    """Endless loader from global step start_step on; returns (loader, sampler)."""
    sampler = ResumableBatchSampler(len(dataset), global_batch, env.rank, env.world_size, seed)
    sampler.start_step = start_step
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                         **loader_options(env, num_workers))
    return loader, sampler


def val_loader(dataset, global_batch: int, env: DistEnv, num_workers: int, collate_fn=None):
    """Rank r takes items r, r + W, ...; metrics are summed over ranks afterwards."""
    subset = torch.utils.data.Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))
    return torch.utils.data.DataLoader(subset, batch_size=max(1, global_batch // env.world_size),
                                       shuffle=False, collate_fn=collate_fn,
                                       **loader_options(env, num_workers))
