"""Image sources for both training stages, behind one contract the trainers rely on.

Every dataset is map-style, except the training stream of `--dataset tar --stream` (StreamingShards, an
IterableDataset: the same items with `key` and `shard` in place of `index`; see datasets/streaming.py).
`ds[key]` takes an int index or an (index, seed) pair, where the seed alone decides the item's randomness
(no global RNG), and returns a dict:
    image    float32 (3, R, R) in [-1, 1]
    index    int, the index actually returned (a later one if unreadable files were skipped)
    skipped  int, how many unreadable files were skipped to produce this item
    caption  str, for captioned sources (COCO, tar shards with .txt, captioned Shapes and scenes splits)
    color, shape, size, row, col   int labels, Shapes world only
    n_objects, objects   int, and (4, 4) long rows of (color, shape, row, col) padded with -1: scenes world only
"""

from __future__ import annotations

import argparse
import glob

import numpy as np
import torch

from datasets.coco import CocoCaptions
from datasets.folder import ImageFolder
from datasets.robust import CorruptImageWarning, DataError, RobustImageDataset
from datasets.scenes import ScenesDataset
from datasets.shapes import ShapesDataset
from datasets.streaming import StreamingShards
from datasets.tarshards import TarShards, expand_shards
from datasets.transforms import EvalTransform, TrainTransform, unpack_key
from engine.cli import at_least

__all__ = [
    "CocoCaptions", "CorruptImageWarning", "DataError", "EvalTransform", "ImageFolder", "SYNTHETIC", "ScenesDataset",
    "ShapesDataset", "StreamingShards", "TarShards", "TrainTransform", "add_data_args", "build_datasets", "has_captions",
    "holdout_split", "unpack_key",
]

DATASET_KINDS = ["shapes", "scenes", "folder", "coco", "tar"]
SYNTHETIC = {"shapes": ShapesDataset, "scenes": ScenesDataset}  # the worlds that need no files


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASET_KINDS, default="shapes",
                       help="image source; shapes (one object) and scenes (1-4 objects) need no files")
    group.add_argument("--data-path", help="folder: image root; coco: image folder; tar: shard directory, "
                                           "glob or brace pattern such as shards-{000000..000009}.tar")
    group.add_argument("--val-data-path", help="validation images, same kind as --data-path; if absent, "
                                               "--val-fraction of the training items is held out")
    group.add_argument("--val-fraction", type=float, default=0.01,
                       help="share of training items held out for validation when no validation set is given")
    group.add_argument("--coco-annotations", help="captions_*.json for the --data-path images")
    group.add_argument("--val-coco-annotations", help="captions_*.json for the validation images "
                                                      "(found in --val-data-path, else --data-path)")
    # One set of flags for both synthetic worlds (--dataset shapes or scenes).
    group.add_argument("--shapes-train-size", type=at_least(1), default=50_000,
                       help="items per training epoch of --dataset shapes or scenes")
    group.add_argument("--shapes-val-size", type=at_least(1), default=1_000,
                       help="validation items of --dataset shapes or scenes")
    group.add_argument("--shapes-split", choices=["unlabeled", "captioned"], default="unlabeled",
                       help="splits of --dataset shapes or scenes: unlabeled (images only: VQGAN, GPT) or "
                            "captioned (CLIP, and the supervised --cond text comparison)")
    group.add_argument("--stream", action="store_true",
                       help="--dataset tar, training only: stream the shards instead of indexing them, split by "
                            "whole shards over processes and data workers; validation reads --val-data-path, "
                            "else --val-fraction of the shards (whole shards) held out")
    group.add_argument("--shuffle-buffer", type=at_least(0), default=1000,
                       help="--stream: samples shuffled within each shard (0: tar order)")


def holdout_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of n items: max(1, round(n * fraction)) items spread evenly over the
    index range go to val, the same ones on every run, so val never leaks into training after a resume."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    if n < 2:
        raise DataError(f"cannot hold out validation items from {n} item(s); add images or pass --val-data-path")
    n_val = min(n - 1, max(1, round(n * fraction)))
    # Evenly spread rather than the last n_val: sorted file lists group similar images (one class per folder).
    val = np.unique(((np.arange(n_val) + 0.5) * n / n_val).astype(np.int64))
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return train, val


def _require(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        if not getattr(args, flag.lstrip("-").replace("-", "_")):
            raise DataError(f"--dataset {args.dataset} needs {flag}")


def _split(full: RobustImageDataset, args: argparse.Namespace, resolution: int):
    train_idx, val_idx = holdout_split(len(full), args.val_fraction)
    return full.subset(train_idx, TrainTransform(resolution)), full.subset(val_idx, EvalTransform(resolution))


def has_captions(dataset) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return bool(getattr(dataset, "captioned", False))
    return "caption" in dataset[0]


def _stream_tar(args: argparse.Namespace, train_tf, eval_tf):
    """(StreamingShards, map-style val). Without --val-data-path, whole shards spread evenly over the list
    are held out (a stream cannot leave out single samples without reading them), the same on every run."""
    paths = expand_shards(args.data_path)
    if args.val_data_path:
        val = TarShards(args.val_data_path, eval_tf)
    else:
        if len(paths) < 2:
            raise DataError(f"--stream holds out whole shards for validation, and {args.data_path} has "
                            f"{len(paths)}: pass --val-data-path")
        train_idx, val_idx = holdout_split(len(paths), args.val_fraction)
        # One TarShards per held-out shard: escaped, so a shard name is never read as a glob.
        parts = [TarShards(glob.escape(paths[i]), eval_tf) for i in val_idx]
        val = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        paths = [paths[i] for i in train_idx]
    train = StreamingShards(paths, train_tf, seed=getattr(args, "seed", 0), shuffle_buffer=args.shuffle_buffer)
    return train, val


def build_datasets(args: argparse.Namespace, resolution: int, streaming: bool = False):
    """(train dataset with random crops, val dataset with centre crops) for the flags of add_data_args.
    With --stream the train dataset is a StreamingShards, for callers that pass streaming=True (trainers
    that feed it to engine.data.stream_loader); others refuse the flag."""
    train_tf, eval_tf = TrainTransform(resolution), EvalTransform(resolution)
    if getattr(args, "stream", False):
        if args.dataset != "tar":
            raise DataError(f"--stream reads webdataset shards: it needs --dataset tar, not {args.dataset}")
        if not streaming:
            raise DataError("--stream is for training (train_vqgan.py, train_gpt.py); this program reads "
                            "map-style data: drop --stream")
        _require(args, "--data-path")
        return _stream_tar(args, train_tf, eval_tf)
    if args.dataset in SYNTHETIC:
        # Unlabeled splits by default: captions never reach the VQGAN or the language-free GPT.
        world = SYNTHETIC[args.dataset]
        split = getattr(args, "shapes_split", "unlabeled")
        captioned = split == "captioned"
        return (world(f"{split}-train", args.shapes_train_size, resolution, captioned=captioned),
                world(f"{split}-val", args.shapes_val_size, resolution, captioned=captioned))
    if args.dataset == "folder":
        _require(args, "--data-path")
        full = ImageFolder(args.data_path, train_tf)
        if args.val_data_path:
            return full, ImageFolder(args.val_data_path, eval_tf)
        return _split(full, args, resolution)
    if args.dataset == "coco":
        _require(args, "--data-path", "--coco-annotations")
        full = CocoCaptions(args.data_path, args.coco_annotations, train_tf)
        if args.val_coco_annotations:
            return full, CocoCaptions(args.val_data_path or args.data_path, args.val_coco_annotations, eval_tf)
        return _split(full, args, resolution)
    if args.dataset == "tar":
        _require(args, "--data-path")
        full = TarShards(args.data_path, train_tf)
        if args.val_data_path:
            return full, TarShards(args.val_data_path, eval_tf)
        return _split(full, args, resolution)
    raise DataError(f"unknown --dataset {args.dataset!r}; choose from {DATASET_KINDS}")
