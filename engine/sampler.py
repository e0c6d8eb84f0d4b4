"""A resumable, distributed batch sampler with per-item seeds.

Each epoch is a permutation drawn from (seed, epoch). Global batch s of the epoch is perm[s*G:(s+1)*G];
rank r takes the r-th contiguous slice of it, so N ranks together see exactly the batch one process would.
Each item is yielded as (index, item_seed): the dataset draws its augmentation from item_seed alone, so
results do not depend on worker processes or on where a run was resumed. Every epoch has the same number of
steps, so the global step alone says where in which epoch a resumed run continues.
"""
from __future__ import annotations

import torch

from engine.errors import DataError


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**62)


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n_items: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n_items < global_batch:
            raise DataError(f"the dataset has {n_items} items, fewer than one batch of {global_batch}: lower "
                            "--batch-size or add data")
        self.n, self.G, self.rank, self.world = n_items, global_batch, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_step = 0  # global step of the first batch the next iterator yields

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.G  # the incomplete last batch is dropped: all steps have the same size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _perm(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return 2**62  # endless: the trainer stops at its step budget, epochs follow from the step

    def __iter__(self):
        """This rank's share of global batches start_step, start_step + 1, ... across epochs. The
        DataLoader prefetches ahead, so the position to save is the trainer's step, not this iterator's."""
        step, per_rank = self.start_step, self.G // self.world
        epoch, perm = None, None
        while True:
            if self.epoch_of(step) != epoch:
                epoch = self.epoch_of(step)
                perm = self._perm(epoch)
            start = (step % self.steps_per_epoch) * self.G + self.rank * per_rank
            yield [(i, item_seed(self.seed, epoch, i)) for i in perm[start:start + per_rank].tolist()]
            step += 1
