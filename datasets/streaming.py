"""Webdataset-format tar shards read as a stream, split over ranks and DataLoader workers by whole shards.

TarShards (map-style) indexes every shard at start-up; for shard sets too large for that, StreamingShards
reads each shard front to back instead. Its items are those of TarShards: members are grouped into samples
by key (consecutive members sharing the part of the path before the first dot of the file name, as
webdataset groups them), a sample's image is its first of IMAGE_EXTENSIONS, `caption` is present when the
data is captioned, `skipped` counts unreadable images passed over; `key` and `shard` say which sample it is.

Reading is plain `tarfile` in stream mode ("r|*"), not the `webdataset` package: exact resume needs control
of every sample position (which shard, which place in it, which seed), of the shuffle buffer's random draws
and of skipping whole shards by their tar headers, all of which webdataset keeps inside its pipeline stages
(with its own RNG seeding); "r|*" also reads gzip/bzip2/xz shards.

Splitting. Each epoch the shard list is permuted by (seed, epoch) (kept in order if shuffle=False); then
worker w of rank r, with W ranks of K workers, takes shards perm[(r*K + w)::(W*K)]. Within an epoch the
W*K streams partition the shards, so together they yield every sample exactly once. Workers whose slot is
beyond the number of shards stay idle (one warning); `engine.data.stream_loader` lowers K so none is.
An optional shuffle buffer reorders samples within each shard (never across shards), seeded by
(seed, epoch, rank, worker, shard). Each sample's augmentation seed is a function of (seed, epoch, shard,
the sample's place in its tar), so the pixels do not depend on who reads it or when.
Training streams are endless: each worker runs epoch after epoch on its own; epochs=1 gives one pass.

Unreadable images. As in RobustImageDataset, a sample whose image cannot be decoded is warned about once
and replaced by the next readable sample (in this shard's output order, wrapping to its start), with
`skipped` counting the failures. A replacement rather than a gap keeps every shard's number of output
positions equal to its number of samples with an image, which its tar headers tell without decoding.

Exact resume. With batch_size=b set, each worker yields lists of b consecutive samples of its stream,
and the DataLoader (batch_size=None, in_order=True) collates one list per batch; it asks its K workers in
turn, so batch i of an iterator is worker (i mod K)'s (i div K)-th list. After global step s a rank has
consumed batches 0..s-1, of which worker v produced (s + K - 1 - v) // K. A fresh iterator again asks its
process 0 first, while global batch s belongs to worker s mod K: so with `start_step = s`, process p
plays worker v = (s + p) mod K (its shards, its shuffle seed) and discards (s + p) // K lists, i.e. b
times as many samples, from the front of v's stream. Writing s + p = qK + v: the fresh iterator's batch
iK + p is global batch s + iK + p = (q + i)K + v, worker v's list q + i, and v had delivered
(s + K - 1 - v) // K = (qK + K - 1 - p) // K = q lists (0 <= p < K), so process p's i-th list is v's
next one: the fresh iterator's batch j is the uninterrupted iterator's batch s + j. This holds because
(1) an endless stream never ends, and no worker is idle (stream_loader sees to it), so no worker drops
out of the rotation and no list is short; (2) a worker's stream depends only on (seed, rank, worker, W,
K, shard contents), not on timing or on what was decoded; (3) samples are discarded by position: a
shard wholly discarded is skipped by its sample count from its tar headers (uncompressed local shards)
or read without decoding (compressed ones), and a partly discarded shard is read, its shuffle buffer
run, and its first positions dropped undecoded.
Prefetched but unconsumed batches need no state: they are produced again. Resume needs the same W, K,
b and seed; with batch_size=None every sample counts as one step.

A shard that is not a readable tar (truncated, not a tar) stops the run with a DataError naming it.
"""

from __future__ import annotations

import os
import tarfile
import warnings
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.robust import MAX_ATTEMPTS, DataError, Transform, load_rgb, one_line, warn_unreadable
from datasets.tarshards import _KEY_AND_EXTENSION, CAPTION_EXTENSION, IMAGE_EXTENSIONS, expand_shards

_WANTED = frozenset(IMAGE_EXTENSIONS) | {CAPTION_EXTENSION}
_P = 1_000_003

Raw = tuple[int, str, dict[str, bytes]]  # (sample's place among the shard's samples, key, {extension: bytes})


class IdleWorkersWarning(UserWarning):
    """Fewer shards than ranks x workers: some workers have nothing to read."""


def sample_seed(seed: int, epoch: int, shard: int, record: int) -> int:
    return (((seed * _P + epoch) * _P + shard) * _P + record) % (2**62)


def _samples(tar: tarfile.TarFile, read: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes, or None if not read}) for each run of members sharing a key, in tar order,
    keeping only samples with an image."""
    key, parts = None, {}
    for member in tar:
        match = _KEY_AND_EXTENSION.match(member.name)
        if not (member.isfile() and match):
            continue
        if match.group(1) != key:
            if key is not None and any(e in parts for e in IMAGE_EXTENSIONS):
                yield key, parts
            key, parts = match.group(1), {}
        ext = match.group(2).lower()
        if ext in _WANTED:
            parts[ext] = tar.extractfile(member).read() if read else None
    if key is not None and any(e in parts for e in IMAGE_EXTENSIONS):
        yield key, parts


def read_shard(path: str) -> Iterator[Raw]:
    """The samples of one shard, front to back, as undecoded bytes."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for record, (key, parts) in enumerate(_samples(tar, read=True)):
                yield record, key, parts
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot read shard {path}: {one_line(error)}") from None


def count_samples(path: str) -> int | None:
    """Samples with an image in one shard from its tar headers alone (the reader seeks over the data), or
    None where that is not cheap (a compressed shard must be decompressed to find its headers)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return sum(1 for _ in _samples(tar, read=False))
    except (tarfile.TarError, OSError):
        return None


def shuffle_within(samples: Iterator[Raw], size: int, rng: np.random.Generator) -> Iterator[Raw]:
    """A shuffle buffer of `size` samples: each new sample takes the place of a random one, which is yielded."""
    buffer: list[Raw] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class StreamingShards(torch.utils.data.IterableDataset):
    """Samples with an image in `shards` (a spec for expand_shards, or a list of shard paths), streamed.

    rank/world_size default to torch.distributed's when constructed (0/1 without a process group); the
    worker comes from get_worker_info(). epochs=None streams forever. batch_size: yield lists of that many
    samples (see the module docstring for why). start_step: the global step the next iterator starts at
    (set it before iter()). captioned: whether items carry `caption`; None decides from the first shard
    (does it hold any .txt; TarShards looks at all of them, which a stream cannot afford).
    samples_per_epoch: optional size hint, only used to estimate the epoch of a step.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str], transform: Transform, *, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 0, epochs: int | None = None,
                 rank: int | None = None, world_size: int | None = None, batch_size: int | None = None,
                 captioned: bool | None = None, samples_per_epoch: int | None = None):
        if isinstance(shards, (str, os.PathLike)):
            self.root = os.fspath(shards)
            self.shard_paths = expand_shards(self.root)
        else:
            self.shard_paths = [os.fspath(p) for p in shards]
            if not self.shard_paths:
                raise DataError("no shards to stream")
            self.root = f"{self.shard_paths[0]} and {len(self.shard_paths) - 1} more shard(s)"
        if shuffle_buffer < 0:
            raise DataError(f"the shuffle buffer must hold 0 or more samples, not {shuffle_buffer}")
        self.transform, self.seed, self.shuffle, self.shuffle_buffer = transform, seed, shuffle, shuffle_buffer
        self.epochs, self.batch_size = epochs, batch_size
        # Read here, in the process that owns the group: DataLoader workers have no process group.
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else torch.distributed.get_rank() if dist_on else 0
        self.world_size = world_size if world_size is not None else \
            torch.distributed.get_world_size() if dist_on else 1
        self.samples_per_epoch = samples_per_epoch
        self.start_step = 0
        self.captioned = self._first_shard_has_captions() if captioned is None else captioned
        self._counts: dict[int, int | None] = {}

    def _first_shard_has_captions(self) -> bool:
        path = self.shard_paths[0]
        try:
            with tarfile.open(path, mode="r:*") as tar:
                return any(CAPTION_EXTENSION in parts for _, parts in _samples(tar, read=False))
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"cannot read shard {path}: {one_line(error)}") from None

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.shard_paths)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed % 2**63, epoch]).permutation(n)

    def describe(self, shard: int, key: str) -> str:
        return f"{self.shard_paths[shard]}:{key}"

    # ---- one worker's stream -------------------------------------------------------------------------

    def __iter__(self):
        rank, world = self.rank, self.world_size
        info = torch.utils.data.get_worker_info()
        process, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh iterator asks worker 0 first, but global batch start_step is the stream of worker
        # start_step mod K, so this process plays worker (start_step + process) mod K (module docstring).
        worker = (self.start_step + process) % workers
        slot, slots = rank * workers + worker, world * workers
        if len(self.shard_paths) < slots and slot == 0:
            warnings.warn(f"{len(self.shard_paths)} shards for {world} rank(s) x {workers} worker(s): "
                          f"{slots - len(self.shard_paths)} worker(s) stay idle", IdleWorkersWarning)
        if slot >= len(self.shard_paths):
            return
        discard = (self.start_step + process) // workers * (self.batch_size or 1)
        samples = self._stream(rank, worker, slot, slots, discard)
        if not self.batch_size:
            yield from samples
            return
        batch = []
        for item in samples:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:  # the end of a finite stream
            yield batch

    def _stream(self, rank: int, worker: int, slot: int, slots: int, discard: int) -> Iterator[dict]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            mine = self.shard_order(epoch)[slot::slots].tolist()
            positions = 0
            for shard in mine:
                if discard:
                    if shard not in self._counts:
                        self._counts[shard] = count_samples(self.shard_paths[shard])
                    count = self._counts[shard]
                    if count is not None and count <= discard:  # skip the whole shard unread
                        discard -= count
                        positions += count
                        continue
                n = yield from self._shard_items(shard, epoch, rank, worker, discard)
                discard -= min(discard, n)
                positions += n
            if positions == 0:
                raise DataError(f"no samples with a {'/'.join(IMAGE_EXTENSIONS)} image in the shards "
                                f"{', '.join(self.shard_paths[s] for s in mine)}")
            epoch += 1

    def _outputs(self, shard: int, epoch: int, rank: int, worker: int) -> Iterator[Raw]:
        """The shard's samples in the order this worker yields them (the same on every call)."""
        samples = read_shard(self.shard_paths[shard])
        if not (self.shuffle and self.shuffle_buffer > 1):
            return samples
        rng = np.random.default_rng([self.seed % 2**63, epoch, rank, worker, shard])
        return shuffle_within(samples, self.shuffle_buffer, rng)

    def _shard_items(self, shard: int, epoch: int, rank: int, worker: int, discard: int):
        """Yield the items of one shard after its first `discard` positions; return its position count."""
        outputs = self._outputs(shard, epoch, rank, worker)
        pending: deque[Raw] = deque()  # samples read ahead to replace an unreadable one
        position = 0
        while True:
            raw = pending.popleft() if pending else next(outputs, None)
            if raw is None:
                return position
            position += 1
            if position > discard:
                yield self._item(raw, pending, outputs, shard, epoch, rank, worker)

    def _candidates(self, first: Raw, pending: deque, outputs: Iterator[Raw], shard: int, epoch: int,
                    rank: int, worker: int) -> Iterator[Raw]:
        """`first`, then the samples after it in output order, then those before it (a fresh read)."""
        yield first
        i = 0
        while True:
            if i < len(pending):
                yield pending[i]
                i += 1
                continue
            nxt = next(outputs, None)
            if nxt is None:
                break
            pending.append(nxt)
        for raw in self._outputs(shard, epoch, rank, worker):
            if raw[0] == first[0]:
                return
            yield raw

    def _item(self, raw: Raw, pending: deque, outputs: Iterator[Raw], shard: int, epoch: int, rank: int,
              worker: int) -> dict[str, Any]:
        seed = sample_seed(self.seed, epoch, shard, raw[0])
        last_error: BaseException | None = None
        candidates = self._candidates(raw, pending, outputs, shard, epoch, rank, worker)
        try:
            for skipped, (_, key, parts) in enumerate(candidates):
                if skipped >= MAX_ATTEMPTS:
                    break
                try:
                    image, extras = self._decode(parts)
                except Exception as error:  # any decoder failure means "unreadable", whatever its type
                    warn_unreadable(self.describe(shard, key), error)
                    last_error = error
                    continue
                # The transform runs outside the try: a bug there must raise, not be taken for a bad file.
                return {"image": self.transform(image, seed), "skipped": skipped, "key": key, "shard": shard,
                        **extras}
        finally:
            candidates.close()
        raise DataError(f"no readable image in {MAX_ATTEMPTS} samples from {self.describe(shard, raw[1])} "
                        f"on (last error: {one_line(last_error)}); is the data corrupt?")

    def _decode(self, parts: dict[str, bytes]) -> tuple[Image.Image, dict[str, Any]]:
        image = load_rgb(next(parts[e] for e in IMAGE_EXTENSIONS if e in parts))
        if not self.captioned:
            return image, {}
        text = parts.get(CAPTION_EXTENSION)
        return image, {"caption": text.decode("utf-8").strip() if text is not None else ""}
