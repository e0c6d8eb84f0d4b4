"""Streamed webdataset shards: whole shards split over ranks and workers partition every epoch, epochs
reshuffle deterministically, a resumed loader continues with exactly the batches of an uninterrupted one,
broken images are skipped like everywhere else, and --stream trains end to end."""
import argparse
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import datasets.streaming as streaming
from datasets import (CorruptImageWarning, DataError, EvalTransform, StreamingShards, TarShards, TrainTransform,
                      add_data_args, build_datasets)
from engine import data
from engine.distributed import DistEnv
from tests.conftest import REPO

SIZES = [1, 4, 2, 3, 3]  # samples per shard: 13 in all, unequal on purpose
KEYS = [f"s{s}/{g:02d}" for s, g in zip(np.repeat(range(len(SIZES)), SIZES), range(sum(SIZES)))]


def png(g: int) -> bytes:
    """A 12 x 10 noise image, different for every g (so crops and samples are told apart)."""
    pixels = np.random.default_rng(g).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, broken=(), compress=False):
    """SIZES shards of samples KEYS (a .png, a .txt caption and an ignored .json each), plus one sample
    without an image in shard 2; images of the keys in `broken` are not PNGs. Returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, g = [], 0
    for s, n in enumerate(SIZES):
        path = folder / (f"shard-{s:03d}.tar" + (".gz" if compress else ""))
        with tarfile.open(path, "w:gz" if compress else "w") as tar:
            members = []
            for _ in range(n):
                key = KEYS[g]
                members += [(f"{key}.png", b"broken" if key in broken else png(g)),
                            (f"{key}.txt", f"caption {key}".encode()), (f"{key}.json", b"{}")]
                if s == 2 and g == 5:
                    members.append(("s2/no-image.txt", b"a caption without an image"))
                g += 1
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


@pytest.fixture
def shards(tmp_path):
    write_shards(tmp_path / "shards")
    return str(tmp_path / "shards")


def keys_of(items):
    return [item["key"] for item in items]


def expected_image(key, transform=EvalTransform(8), seed=None):
    return transform(Image.open(io.BytesIO(png(KEYS.index(key)))), seed)


def one_epoch(ds, workers):
    if workers == 0:
        return list(ds)
    return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_yields_every_sample_once(shards, workers):
    ds = StreamingShards(shards, EvalTransform(8), epochs=1, shuffle_buffer=3)
    items = one_epoch(ds, workers)
    assert sorted(keys_of(items)) == KEYS  # every sample once; the .txt-only sample is not one
    for item in items:
        assert item["caption"] == f"caption {item['key']}" and item["skipped"] == 0
        assert torch.equal(item["image"], expected_image(item["key"]))
        assert ds.shard_paths[item["shard"]].endswith(f"shard-{item['key'][1]:0>3}.tar")


def test_epochs_reshuffle_and_each_is_complete(shards):
    def first_epochs(seed, n=2, **kw):
        ds = StreamingShards(shards, EvalTransform(8), seed=seed, shuffle_buffer=2, **kw)
        keys = keys_of(itertools.islice(ds, n * len(KEYS)))  # one process: epoch e is items 13e..13e+12
        return [keys[e * len(KEYS):(e + 1) * len(KEYS)] for e in range(n)]

    a, b = first_epochs(seed=0)
    assert sorted(a) == sorted(b) == KEYS and a != b
    assert first_epochs(seed=0) == [a, b]  # same seed, same order
    assert first_epochs(seed=1) != [a, b]
    assert first_epochs(seed=0, shuffle=False) == [KEYS, KEYS]  # tar order, shard by shard

    # Two workers over two epochs: each worker runs its own epochs, together every sample twice.
    ds = StreamingShards(shards, EvalTransform(8), epochs=2, shuffle_buffer=2)
    keys = keys_of(one_epoch(ds, workers=2))
    assert sorted(keys) == sorted(KEYS * 2)


def test_more_slots_than_shards_warns_and_still_partitions(shards):
    def rank(r):
        return keys_of(StreamingShards(shards, EvalTransform(8), epochs=1, rank=r, world_size=6))

    with pytest.warns(streaming.IdleWorkersWarning, match="5 shards for 6 rank"):
        keys = rank(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only slot 0 warns
        others = [rank(r) for r in range(1, 6)]
    assert others[-1] == []  # slot 5 of 6 has no shard
    assert sorted(keys + sum(others, [])) == KEYS


def _rank_main(rank, port, shards, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ds = StreamingShards(shards, EvalTransform(8), epochs=1, seed=7, shuffle_buffer=2)  # rank from dist
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    mine = [(item["key"], item["shard"]) for item in loader]
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_with_two_workers_partition_an_epoch(shards, tmp_path):
    out = tmp_path / "keys.json"
    mp.start_processes(_rank_main, args=(_free_port(), shards, str(out)), nprocs=2, start_method="fork")
    ranks = json.loads(out.read_text())
    keys = [k for r in ranks for k, _ in r]
    assert sorted(keys) == KEYS  # every sample exactly once over both ranks
    shard_sets = [{s for _, s in r} for r in ranks]
    assert all(shard_sets) and not shard_sets[0] & shard_sets[1]  # split by whole shards, both busy


def _batches(ds, env, start_step, n, workers):
    loader, _ = data.stream_loader(ds, 2, env, start_step, workers)
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it  # shuts the workers down
    return out


@pytest.mark.filterwarnings("ignore::datasets.robust.CorruptImageWarning")
@pytest.mark.parametrize("workers,compress", [(2, False), (0, True)])
def test_resume_continues_with_the_uninterrupted_batches(tmp_path, workers, compress):
    # Random crops (the seed matters), a shuffle buffer, a broken image and, with K=0, gzip shards whose
    # sample counts cannot be read from headers (the read-and-discard path). 14 batches of 2 run every
    # worker through more than one epoch.
    paths = write_shards(tmp_path / "s", broken={KEYS[6]}, compress=compress)
    env = DistEnv()

    def dataset():
        return StreamingShards(paths, TrainTransform(8), seed=3, shuffle_buffer=3)

    full = _batches(dataset(), env, 0, 14, workers)
    assert sum(int(b["skipped"].sum()) for b in full) >= 1
    for s in (3, 8):
        resumed = _batches(dataset(), env, s, 14 - s, workers)
        for a, b in zip(full[s:], resumed, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
            assert torch.equal(a["skipped"], b["skipped"])


def test_resume_skips_whole_shards_unread(shards, monkeypatch):
    opened, decoded = [], []
    read_shard, load_rgb = streaming.read_shard, streaming.load_rgb
    monkeypatch.setattr(streaming, "read_shard", lambda p: opened.append(os.path.basename(p)) or read_shard(p))
    monkeypatch.setattr(streaming, "load_rgb", lambda b: decoded.append(1) or load_rgb(b))
    ds = StreamingShards(shards, EvalTransform(8), shuffle=False, batch_size=3)
    ds.start_step = 3  # 9 samples: shards 0-2 (7) skipped from headers, 2 of shard 3 read undecoded
    batch = next(iter(ds))
    assert keys_of(batch) == KEYS[9:12]
    assert opened == ["shard-003.tar", "shard-004.tar"] and len(decoded) == 3


def test_broken_image_is_replaced_warned_once_and_counted(tmp_path):
    # KEYS[4] ends shard 1, so its replacement wraps to the shard's first sample; KEYS[8] is mid-shard.
    paths = write_shards(tmp_path / "s", broken={KEYS[4], KEYS[8]})
    ds = StreamingShards(paths, EvalTransform(8), shuffle=False, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ds)
    broken = [w for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(broken) == 2  # one per broken image, not one per epoch
    assert f"{paths[1]}:{KEYS[4]}" in str(broken[0].message) and f"{paths[3]}:{KEYS[8]}" in str(broken[1].message)
    assert len(items) == 2 * len(KEYS)  # a replacement, not a gap: the resume arithmetic holds
    epoch = items[:len(KEYS)]
    assert keys_of(epoch) == KEYS[:4] + [KEYS[1]] + KEYS[5:8] + [KEYS[9]] + KEYS[9:]
    assert [item["skipped"] for item in epoch] == [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    assert keys_of(items[len(KEYS):]) == keys_of(epoch)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_data_args(p)
    return p.parse_args(argv)


def test_build_datasets_streams_and_holds_out_whole_shards(shards):
    args = parse("--dataset", "tar", "--stream", "--data-path", shards, "--val-fraction", "0.2",
                 "--shuffle-buffer", "4")
    train, val = build_datasets(args, 8, streaming=True)
    assert isinstance(train, StreamingShards) and train.shuffle_buffer == 4
    assert isinstance(val, TarShards) and len(val) == 2  # one whole shard of five: the middle one
    held_out = {val[i]["caption"].split()[1] for i in range(len(val))}
    assert held_out == set(KEYS[5:7])
    assert sorted(keys_of(StreamingShards(train.shard_paths, EvalTransform(8), epochs=1))) == \
        sorted(set(KEYS) - held_out)
    with pytest.raises(DataError, match="--dataset tar"):
        build_datasets(parse("--stream"), 8, streaming=True)
    with pytest.raises(DataError, match="drop --stream"):
        build_datasets(args, 8)  # a program that needs map-style data


def test_stream_loader_lowers_workers_to_keep_every_one_busy(shards, capsys):
    ds = StreamingShards(shards, EvalTransform(8))
    loader, position = data.stream_loader(ds, 4, DistEnv(rank=0, world_size=2), 0, 4)
    assert loader.num_workers == 2 and ds.batch_size == 2 and (ds.rank, ds.world_size) == (0, 2)
    assert "2 data worker(s) per process instead of 4" in capsys.readouterr().err
    assert position.epoch_of(100) == -1
    with pytest.raises(DataError, match="cannot feed 8 processes"):
        data.stream_loader(ds, 8, DistEnv(world_size=8), 0, 0)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in list(env):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or \
                k.startswith(("SLURM_", "TORCHELASTIC_", "CLIPGEN_")):
            del env[k]
    return env


def run_vqgan(args, out):
    cmd = [sys.executable, "train_vqgan.py", "--preset", "shapes", "--batch-size", "4", "--no-tensorboard",
           "--log-every", "1", "--val-batches", "1", "--device", "cpu", "--out-dir", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_train_vqgan_on_a_stream(shards, tmp_path):
    r = run_vqgan(["--dataset", "tar", "--stream", "--data-path", shards, "--val-data-path", shards,
                   "--max-steps", "3", "--val-every", "3", "--num-workers", "2"], tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert [l.split()[1] for l in r.stdout.splitlines() if l.startswith("step ")] == ["1/3", "2/3", "3/3"]
    state = torch.load(tmp_path / "out" / "latest.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["epoch"] == -1


def test_stream_without_tar_is_one_line_error(tmp_path):
    r = run_vqgan(["--dataset", "shapes", "--stream", "--max-steps", "1"], tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--stream" in last and "--dataset tar" in last, r.stderr


def test_train_gpt_on_a_stream_with_captions(shards, tmp_path):
    from models.clip import build_open_clip
    from models.vqgan import VQGAN
    from tests.tiny import TINY_CLIP, TINY_VQGAN

    torch.manual_seed(0)
    torch.save({"kind": "vqgan", "config": TINY_VQGAN.to_dict(), "model": VQGAN(TINY_VQGAN).state_dict()},
               tmp_path / "vqgan.pt")
    torch.save({"kind": "clip", "open_clip_config": TINY_CLIP, "model": build_open_clip(TINY_CLIP).state_dict()},
               tmp_path / "clip.pt")
    cmd = [sys.executable, "train_gpt.py", "--vqgan", str(tmp_path / "vqgan.pt"), "--clip", str(tmp_path / "clip.pt"),
           "--batch-size", "4", "--no-tensorboard", "--log-every", "1", "--num-workers", "2", "--device", "cpu",
           "--prompts", "a red circle", "--cond", "text", "--dataset", "tar", "--stream", "--data-path", shards,
           "--val-fraction", "0.2", "--max-steps", "2", "--val-every", "2", "--out-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cond text" in r.stdout and len([l for l in r.stdout.splitlines() if l.startswith("step ")]) == 2
    state = torch.load(tmp_path / "out" / "latest.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["epoch"] == -1
