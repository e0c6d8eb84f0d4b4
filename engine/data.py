"""DataLoaders the trainers share: a resumable, rank-sliced training stream and a rank-sharded val set."""
from __future__ import annotations

import signal
import sys

import torch

from engine.distributed import DistEnv
from engine.errors import DataError
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


class StreamPosition:
    """What a trainer asks of its sampler, for a stream. A stream has no exact epoch: its workers each run
    through their own shards at their own pace. epoch_of(step) is the number of passes over the data the
    samples of `step` global batches amount to when the dataset knows its size (samples_per_epoch), else -1."""

    def __init__(self, global_batch: int, samples_per_epoch: int | None):
        self.global_batch, self.samples_per_epoch = global_batch, samples_per_epoch

    def epoch_of(self, step: int) -> int:
        return step * self.global_batch // self.samples_per_epoch if self.samples_per_epoch else -1


def stream_loader(dataset, global_batch: int, env: DistEnv, start_step: int, num_workers: int, collate_fn=None):
    """Endless loader over a datasets.streaming.StreamingShards from global step start_step on; returns
    (loader, StreamPosition). Each worker batches its own stream and the loader takes the workers' batches
    in turn, which is what makes start_step exact (see datasets/streaming.py)."""
    if global_batch % env.world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {env.world_size} processes")
    n_shards = len(dataset.shard_paths)
    if n_shards < env.world_size:
        raise DataError(f"{n_shards} shard(s) cannot feed {env.world_size} processes: a stream splits by whole "
                        f"shards, so write at least {env.world_size} (or drop --stream)")
    workers = min(num_workers, n_shards // env.world_size)
    if workers < num_workers and env.is_main:
        # An idle worker would leave the loader's rotation and break the batch order start_step relies on.
        print(f"warning: {n_shards} shards for {env.world_size} process(es): {workers} data worker(s) per "
              f"process instead of {num_workers}", file=sys.stderr)
    dataset.rank, dataset.world_size = env.rank, env.world_size
    dataset.batch_size, dataset.start_step, dataset.epochs = global_batch // env.world_size, start_step, None
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, in_order=True,
                                         collate_fn=collate_fn or torch.utils.data.default_collate,
                                         **loader_options(env, workers))
    return loader, StreamPosition(global_batch, dataset.samples_per_epoch)


def val_loader(dataset, global_batch: int, env: DistEnv, num_workers: int, collate_fn=None):
    """Rank r takes items r, r + W, ...; metrics are summed over ranks afterwards."""
    subset = torch.utils.data.Subset(dataset, list(range(env.rank, len(dataset), env.world_size)))
    return torch.utils.data.DataLoader(subset, batch_size=max(1, global_batch // env.world_size),
                                       shuffle=False, collate_fn=collate_fn,
                                       **loader_options(env, num_workers))
