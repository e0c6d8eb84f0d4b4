"""Pre-encoded shards remember which VQGAN and CLIP made them: preencode.py refuses to continue a folder
another network made (--overwrite re-encodes it), and train_gpt.py's check refuses shards of other networks."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from datasets import encoded
from datasets.encoded import EncodedShards, shard_name
from datasets.robust import DataError
from datasets.shapes import ShapesDataset
from models.clip import build_open_clip, load_clip
from models.convert import load_vqgan
from models.fingerprint import fingerprint
from models.vqgan import VQGAN, VQGANConfig
from tests import forkrun
from tests.conftest import REPO
from tests.test_train_vqgan import _env
from tests.tiny import TINY_CLIP, TINY_VQGAN

SIZES = ["--shapes-train-size", "96", "--shapes-val-size", "16", "--shard-size", "40", "--num-workers", "0"]


def other_vqgan(path, cfg=TINY_VQGAN):
    """A VQGAN shaped like the fixture's (same codes, same grid) with other weights: shape checks pass it."""
    torch.manual_seed(1)
    torch.save({"kind": "vqgan", "config": cfg.to_dict(), "model": VQGAN(cfg).state_dict()}, path)
    return path


def other_clip(path):
    torch.manual_seed(1)
    torch.save({"kind": "clip", "open_clip_config": TINY_CLIP, "model": build_open_clip(TINY_CLIP).state_dict()},
               path)
    return path


def preencode(vqgan, clip, out, *extra):
    return forkrun.run("preencode.py", "--vqgan", vqgan, "--clip", clip, "--out", out, *SIZES, *extra)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fingerprint_is_the_weights_not_the_load(frozen, tmp_path):
    # The fixture's shards were written by preencode.py in another process, from a channels-last VQGAN.
    meta = EncodedShards(frozen / "enc-unlabeled" / "train").meta["models"]
    a, b = load_vqgan(frozen / "vqgan.pt"), load_vqgan(frozen / "vqgan.pt").channels_last()
    assert b.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not b.encoder.conv_in.weight.is_contiguous()
    assert fingerprint(a) == fingerprint(b) == meta["vqgan"]["fingerprint"]
    assert fingerprint(load_clip(str(frozen / "clip.pt"))) == meta["clip"]["fingerprint"]
    # Training counters do not count; the weights, and settings that change the codes, do.
    a.quantize.usage.mul_(0.5)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(load_vqgan(other_vqgan(tmp_path / "v.pt"))) != fingerprint(b)
    no_l2 = VQGAN(VQGANConfig(**{**TINY_VQGAN.to_dict(), "l2_codes": False}))
    no_l2.load_state_dict(b.state_dict())
    assert fingerprint(no_l2) != fingerprint(b)
    assert fingerprint(load_clip(str(other_clip(tmp_path / "c.pt")))) != meta["clip"]["fingerprint"]


def test_check_models_refuses_other_networks_and_old_shards(frozen, tmp_path):
    vqgan, clip = load_vqgan(frozen / "vqgan.pt"), load_clip(str(frozen / "clip.pt"))
    train, val = EncodedShards(frozen / "enc-unlabeled" / "train"), EncodedShards(frozen / "enc-unlabeled" / "val")
    encoded.check_models(vqgan, clip, train, val)  # the networks that made them: accepted
    with pytest.raises(DataError, match="another VQGAN .*re-run preencode.py") as e:
        encoded.check_models(load_vqgan(other_vqgan(tmp_path / "v.pt")), clip, train, val)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="another CLIP"):
        encoded.check_models(vqgan, load_clip(str(other_clip(tmp_path / "c.pt"))), train, val)
    del val.meta["models"]  # as meta.json was before fingerprints were recorded
    with pytest.raises(DataError, match="older preencode.py .*--overwrite"):
        encoded.check_models(vqgan, clip, train, val)


@pytest.mark.parametrize("which", ["vqgan", "clip"])
def test_preencode_refuses_a_folder_other_networks_made(frozen, tmp_path, which):
    out = tmp_path / "enc"
    shutil.copytree(frozen / "enc-unlabeled", out)
    (out / "train" / "meta.json").unlink()  # an interrupted run: the shards alone must say who made them
    before = snapshot(out)
    nets = {"vqgan": frozen / "vqgan.pt", "clip": frozen / "clip.pt"}
    nets[which] = (other_vqgan if which == "vqgan" else other_clip)(tmp_path / "other.pt")
    r = preencode(nets["vqgan"], nets["clip"], out)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"another {which.upper()}" in last and "--overwrite" in last, r.stderr
    assert snapshot(out) == before  # nothing deleted, rewritten or added


def test_preencode_refuses_to_continue_old_shards_and_other_precision(frozen, tmp_path):
    vqgan, clip = load_vqgan(frozen / "vqgan.pt"), load_clip(str(frozen / "clip.pt"))
    record = encoded.models_record(vqgan, clip, "v.pt", "c.pt", "fp32")
    folder = tmp_path / "train"
    shutil.copytree(frozen / "enc-unlabeled" / "train", folder)
    encoded.check_resume(folder, record)  # same networks: may continue
    with pytest.raises(DataError, match="encoded in fp32, not bf16: pass --precision fp32"):
        encoded.check_resume(folder, {**record, "precision": "bf16"})
    (folder / "meta.json").unlink()
    path = folder / shard_name(1)
    encoded.write_shard(folder, 1, load_file(path), {"first": 40, "n": 40})  # as written before fingerprints
    with pytest.raises(DataError, match=f"{shard_name(1)} was written by an older preencode.py .*--overwrite"):
        encoded.check_resume(folder, record)


def test_overwrite_reencodes_with_the_new_vqgan(frozen, tmp_path):
    out = tmp_path / "enc"
    shutil.copytree(frozen / "enc-unlabeled", out)
    (out / "train" / "notes.txt").write_text("mine")
    new = other_vqgan(tmp_path / "other.pt")
    r = preencode(new, frozen / "clip.pt", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "train: deleted 3 shards" in r.stdout and "train: shard 1/3" in r.stdout
    assert (out / "train" / "notes.txt").read_text() == "mine"  # only the set's own files go
    vqgan, clip = load_vqgan(new), load_clip(str(frozen / "clip.pt"))
    ds = EncodedShards(out / "train")
    encoded.check_models(vqgan, clip, ds, EncodedShards(out / "val"))
    assert json.loads((out / "train" / "meta.json").read_text())["vqgan"] == str(new)
    src = ShapesDataset("unlabeled-train", 96)
    for i in (0, 95):
        with torch.no_grad():
            _, tokens, _, _ = vqgan.encode(src[i]["image"][None])
        assert torch.equal(ds[i]["tokens"], tokens[0])
    old = EncodedShards(frozen / "enc-unlabeled" / "train")
    assert not torch.equal(ds.tensors["tokens"], old.tensors["tokens"])


def test_train_gpt_refuses_shards_of_a_same_shaped_vqgan(frozen, tmp_path):
    r = subprocess.run([sys.executable, "train_gpt.py", "--vqgan", str(other_vqgan(tmp_path / "v.pt")), "--clip",
                        str(frozen / "clip.pt"), "--shards", str(frozen / "enc-unlabeled"), "--max-steps", "1",
                        "--num-workers", "0", "--no-tensorboard", "--out-dir", str(tmp_path / "o")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "another VQGAN" in r.stderr.strip().splitlines()[-1], r.stderr
