"""Issue 19: hostile inputs and faults. Every script given each bad input ends in one `error:` line and a
non-zero exit, no traceback; images decode to the picture a viewer shows; the output folder is locked for
a run and cleaned of a killed run's temporaries; --resume auto falls back from an unreadable latest.pt;
a full disk says so in one line and keeps the previous checkpoint.

The scripts run as `python SCRIPT ARGS` runs them, through tests/forkrun.py (one process importing torch
once, forking a child per run): dozens of fresh interpreters would spend minutes importing torch.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.encoded import shard_name, write_meta, write_shard
from datasets.robust import load_rgb
from engine import checkpoint as ckpt
from engine.images import decode_rgb
from tests.conftest import REPO, assert_one_error
from tests.test_train_vqgan import _env
from tests.tiny import TINY_CLIP, tiny_gpt, write_tiny

# A VQGAN run of the shapes preset in a few seconds: 2 images a step, 8 in the epoch.
VQ = ["--preset", "shapes", "--batch-size", "2", "--shapes-train-size", "8", "--shapes-val-size", "2",
      "--val-batches", "1", "--num-workers", "0", "--no-tensorboard", "--device", "cpu", "--log-every", "1"]


# -------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def runner(forkrun):
    return forkrun


def write_encoded(folder, n: int = 4) -> None:
    """A small, well-formed pre-encoded split (train_gpt.py --shards reads it before any model check)."""
    record = {"vqgan": {"fingerprint": "0" * 16, "source": "v"}, "clip": {"fingerprint": "0" * 16, "source": "c"},
              "precision": "fp32"}
    folder.mkdir(parents=True)
    write_shard(folder, 0, {"tokens": torch.zeros(n, 8, 8, dtype=torch.int16),
                            "image_embed": torch.zeros(n, 32, dtype=torch.float16), "index": torch.arange(n)},
                {"first": 0, "n": n, "models": record})
    write_meta(folder, {"n_items": n, "n_shards": 1, "shard_size": n, "n_codes": 32, "grid_size": 8,
                        "embed_dim": 32, "models": record})


def broken_metadata(src, dst, **meta) -> None:
    """A copy of a save_weights file with some metadata replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        old = f.metadata()
    save_file(load_file(str(src)), str(dst), metadata={**old, **meta})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bad inputs, made once: a namespace of paths."""
    root = write_tiny(tmp_path_factory.mktemp("hostile"))
    f = types.SimpleNamespace(root=root, vqgan=root / "vqgan.pt", clip=root / "clip.pt")
    f.zero = root / "zero.pt"
    f.zero.write_bytes(b"")
    f.a_file = root / "a-file"
    f.a_file.write_text("not a folder")
    f.read_only = root / "read-only"
    f.read_only.mkdir()
    f.read_only.chmod(0o555)
    if os.access(f.read_only, os.W_OK):  # root writes anywhere it may: /sys refuses even root
        f.read_only = "/sys/clipgen-hostile"
    f.bad_images = root / "bad-images"
    f.bad_images.mkdir()
    for i in range(3):
        (f.bad_images / f"{i}.png").write_bytes(b"not a png")
    f.bad_vgg = root / "vgg16.pth"
    f.bad_vgg.write_bytes(b"\x80\x02junk")
    # Weights files whose metadata is well-formed safetensors but not what export.py writes.
    from engine.checkpoint import save_weights
    from models.clip import build_open_clip

    gpt = tiny_gpt()
    save_weights(root / "gpt.safetensors", "gpt", gpt.cfg.to_dict(), gpt.state_dict())
    save_weights(root / "clip.safetensors", "clip", TINY_CLIP, build_open_clip(TINY_CLIP).state_dict())
    f.clip_extra_list = root / "clip-extra-list.safetensors"
    broken_metadata(root / "clip.safetensors", f.clip_extra_list, extra="[1, 2]")
    f.clip_bad_preprocess = root / "clip-bad-preprocess.safetensors"
    broken_metadata(root / "clip.safetensors", f.clip_bad_preprocess, extra='{"preprocess": 3}')
    f.gpt_deep_config = root / "gpt-deep-config.safetensors"
    broken_metadata(root / "gpt.safetensors", f.gpt_deep_config, config="[" * 100_000 + "]" * 100_000)
    # Damaged pre-encoded sets: each a copy of a good one with one thing broken.
    good = root / "enc-good"
    for split in ("train", "val"):
        write_encoded(good / split)
    f.enc = {}
    damage = {
        "truncated shard": lambda d: (d / shard_name(0)).write_bytes((d / shard_name(0)).read_bytes()[:100]),
        "empty shard": lambda d: (d / shard_name(0)).write_bytes(b""),
        "unparsable meta": lambda d: (d / "meta.json").write_text('{"format": "clipgen-encoded-v1", "n_'),
        "incomplete meta": lambda d: (d / "meta.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "n_items"})),
    }
    for name, breaks in damage.items():
        shutil.copytree(good, root / name)
        breaks(root / name / "train")
        f.enc[name] = root / name
    return f


@pytest.fixture(scope="module")
def trained(runner, tmp_path_factory):
    """An output folder of a 2-step VQGAN run: latest.pt at step 2, step_0000001.pt and step_0000002.pt."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = runner("train_vqgan.py", *VQ, "--max-steps", "2", "--keep-every", "1", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    return out


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------- bad inputs, one line each

def bad_inputs(f):
    """(id, script, args, what the error line says). Each one failed before issue 19's fixes: a traceback,
    argparse's usage block, or exit 0 having done nothing."""
    vq = ["train_vqgan.py", *VQ, "--max-steps", "1", "--out-dir", f.root / "vq-out"]
    gpt = ["train_gpt.py", "--vqgan", f.vqgan, "--clip", f.clip, "--batch-size", "2", "--num-workers", "0",
           "--shapes-train-size", "8", "--shapes-val-size", "2", "--no-tensorboard", "--device", "cpu",
           "--max-steps", "1", "--out-dir", f.root / "gpt-out"]
    clip = ["train_clip.py", "--preset", "tiny", "--no-tensorboard", "--device", "cpu", "--num-workers", "0",
            "--out-dir", f.root / "clip-out"]
    pre = ["preencode.py", "--vqgan", f.vqgan, "--clip", f.clip, "--out", f.root / "enc-out", "--num-workers", "0"]
    shipped = REPO / "pretrained" / "shapes"
    ev = ["evaluate.py", "--vqgan", shipped / "vqgan.safetensors", "--gpt", shipped / "gpt.safetensors",
          "--clip", shipped / "clip.safetensors", "--prompts", "1", "--samples", "1", "--fd-real", "0"]
    demo = ["demo.py", "--text", "a red circle", "--cand-size", "2", "--out-k", "1", "--out", f.root / "demo.png"]
    cases = [
        ("evaluate prompts 0", ev + ["--prompts", "0"], "--prompts"),
        ("evaluate samples 0", ev + ["--samples", "0"], "--samples"),
        ("evaluate batch 0", ev + ["--batch-size", "0"], "--batch-size"),
        ("evaluate temperature 0", ev + ["--temperature", "0"], "--temperature"),
        ("evaluate top-k 0", ev + ["--top-k", "0"], "--top-k"),
        ("evaluate top-p 1.5", ev + ["--top-p", "1.5"], "--top-p"),
        ("evaluate cfg nan", ev + ["--cfg-scale", "nan"], "--cfg-scale"),
        ("evaluate seed 1e23", ev + ["--seed", str(10**23)], "--seed"),
        ("evaluate device potato", ev + ["--device", "potato"], "--device potato"),
        ("evaluate json into a missing folder", ev + ["--json", f.root / "missing" / "r.json"], "does not exist"),
        ("evaluate bad flag", ev + ["--no-such-flag"], "--no-such-flag"),
        ("demo cfg inf", demo + ["--cfg-scale", "inf"], "--cfg-scale"),
        ("demo cfg nan", demo + ["--cfg-scale", "nan"], "--cfg-scale"),
        ("demo seed 1e23", demo + ["--seed", str(10**23)], "--seed"),
        ("demo seed -1", demo + ["--seed", "-1"], "--seed"),
        ("demo device meta", demo + ["--device", "meta"], "--device meta"),
        ("vqgan batch 0", vq + ["--batch-size", "0"], "--batch-size"),
        ("vqgan batch -2", vq + ["--batch-size", "-2"], "--batch-size"),
        ("vqgan batch > data", vq + ["--batch-size", "16"], "fewer than one batch of 16"),
        ("vqgan save-every 0", vq + ["--save-every", "0"], "--save-every"),
        ("vqgan log-every -1", vq + ["--log-every", "-1"], "--log-every"),
        ("vqgan val-every -1", vq + ["--val-every", "-1"], "--val-every"),
        ("vqgan n-codes 0", vq + ["--n-codes", "0"], "--n-codes"),
        ("vqgan lr nan", vq + ["--lr", "nan"], "--lr"),
        ("vqgan num-workers -1", vq + ["--num-workers", "-1"], "--num-workers"),
        ("vqgan max-steps 0", vq + ["--max-steps", "0"], "--max-steps"),
        ("vqgan device potato", vq + ["--device", "potato"], "--device potato"),
        ("vqgan device meta", vq + ["--device", "meta"], "--device meta"),
        ("vqgan out-dir a file", vq + ["--out-dir", f.a_file], "is a file"),
        ("vqgan out-dir read-only", vq + ["--out-dir", f"{f.read_only}/run"], "cannot write to --out-dir"),
        ("vqgan resume 0-byte", vq + ["--resume", f.zero], "cannot read checkpoint"),
        ("vqgan lpips-vgg bad", vq + ["--perceptual-weight", "1", "--lpips-vgg", f.bad_vgg], "VGG16"),
        ("vqgan only bad images", vq + ["--dataset", "folder", "--data-path", f.bad_images], "unreadable images"),
        ("vqgan only bad images, a worker", vq + ["--dataset", "folder", "--data-path", f.bad_images,
                                                  "--num-workers", "1"], "unreadable images"),
        ("export 0-byte", ["export.py", f.zero, f.root / "x.safetensors"], "cannot read checkpoint"),
        ("gpt clip 0-byte", gpt[:4] + [f.zero] + gpt[5:], "cannot read checkpoint"),
        ("gpt clip extra a list", gpt[:4] + [f.clip_extra_list] + gpt[5:], "'extra' metadata"),
        ("gpt clip bad preprocess", gpt[:4] + [f.clip_bad_preprocess] + gpt[5:], "'preprocess'"),
        ("gpt init-from deep config", gpt + ["--init-from", f.gpt_deep_config], "'config' metadata"),
        ("gpt batch 0", gpt + ["--batch-size", "0"], "--batch-size"),
        ("gpt lr inf", gpt + ["--lr", "inf"], "--lr"),
        *[(f"gpt shards: {name}", gpt + ["--shards", folder], "re-run preencode.py") for name, folder in f.enc.items()],
        ("clip batch 0", clip + ["--batch-size", "0"], "--batch-size"),
        ("clip max-steps 0", clip + ["--max-steps", "0"], "--max-steps"),
        ("clip hard negatives on shapes", clip + ["--hard-negatives"], "--dataset scenes"),
        ("preencode shard-size 0", pre + ["--shard-size", "0"], "--shard-size"),
        ("preencode batch 0", pre + ["--batch-size", "0"], "--batch-size"),
        ("preencode num-workers -1", pre + ["--num-workers", "-1"], "--num-workers"),
        ("preencode device potato", pre + ["--device", "potato"], "--device potato"),
        # the flow prior's flags (issue 16)
        ("flow gpt preset", gpt + ["--model", "flow", "--preset", "gpt2-medium"], "not a flow preset"),
        ("flow steps 0 to train", gpt + ["--model", "flow", "--flow-steps", "0"], "--flow-steps"),
        ("flow solver rk4", gpt + ["--model", "flow", "--flow-solver", "rk4"], "--flow-solver"),
        ("demo prior and gpt", demo + ["--prior", "flow", "--gpt", shipped / "gpt.safetensors"], "give one of them"),
        ("demo flow steps on a gpt", demo + ["--flow-steps", "3"], "is for the flow prior"),
        ("demo top-k on the flow prior", demo + ["--prior", "flow", "--top-k", "5"], "--top-k filters"),
        ("demo sjd on the flow prior", demo + ["--prior", "flow", "--parallel", "sjd"], "--parallel is for a GPT"),
        ("demo static step on the flow prior", demo + ["--prior", "flow", "--decode-step", "static"],
         "--decode-step is for a GPT"),
        ("demo sjd with a static step", demo + ["--parallel", "sjd", "--decode-step", "static"], "one-token steps"),
        ("demo decode step compiled", demo + ["--decode-step", "compiled"], "--decode-step"),
        ("demo sjd window 0", demo + ["--parallel", "sjd", "--sjd-window", "0"], "--sjd-window"),
        ("demo zipar window 0", demo + ["--parallel", "zipar", "--zipar-window", "0"], "--zipar-window"),
        ("demo zipar with a static step", demo + ["--parallel", "zipar", "--decode-step", "static"],
         "one-token steps"),
        ("evaluate flow steps on a gpt", ev + ["--flow-steps", "3"], "is for the flow prior"),
        ("evaluate flow steps -1", ev + ["--flow-steps", "-1"], "--flow-steps"),
    ]
    if not torch.cuda.is_available():
        cases.append(("vqgan device cuda, no GPU", vq + ["--device", "cuda"], "CUDA is not available"))
        cases.append(("evaluate device cuda, no GPU", ev + ["--device", "cuda"], "CUDA is not available"))
        cases.append(("demo cuda-graph step on a CPU", demo + ["--decode-step", "cuda-graph"],
                      "needs a CUDA device"))
    return cases


def test_every_bad_input_ends_in_one_error_line(runner, files):
    failures = []
    for name, (script, *args), needle in bad_inputs(files):
        r = runner(script, *args)
        try:
            assert_one_error(r, needle)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


def test_cluster_submit_runs_as_a_script(tmp_path):
    # A real interpreter: what matters is the sys.path `python cluster/submit.py` starts with.
    r = subprocess.run([sys.executable, str(REPO / "cluster" / "submit.py"), "--help"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


# --------------------------------------------------------------------------------- resume and max-steps

def test_resume_at_max_steps_says_there_is_nothing_to_train(runner, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    before = (out / "latest.pt").read_bytes()
    r = runner("train_vqgan.py", *VQ, "--max-steps", "2", "--resume", "auto", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "nothing to train: the run is already at step 2 of --max-steps 2" in r.stdout
    assert (out / "latest.pt").read_bytes() == before


def test_resume_past_max_steps_is_refused(runner, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    assert_one_error(runner("train_vqgan.py", *VQ, "--max-steps", "1", "--resume", "auto", "--out-dir", out),
                     "past --max-steps 1")


def test_truncated_latest_falls_back_to_newest_step_file_and_temps_are_removed(runner, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    latest = out / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated copy
    (out / ".latest.pt.k1ll3d.tmp").write_bytes(b"x" * 4096)  # what SIGKILL mid-save leaves
    (out / ".step_0000002.pt.k1ll3d.tmp").write_bytes(b"x" * 4096)
    r = runner("train_vqgan.py", *VQ, "--max-steps", "3", "--resume", "auto", "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert "warning: latest.pt is unreadable" in r.stderr and "resuming from step_0000002.pt instead" in r.stderr
    assert "resuming at step 2 (latest.pt is unreadable" in r.stdout
    assert "removed 2 temporary file(s)" in r.stdout
    assert not list(out.glob(".*.tmp"))
    assert ckpt.load(latest)["step"] == 3


def test_named_unreadable_checkpoint_does_not_fall_back(runner, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    (out / "latest.pt").write_bytes(b"")
    assert_one_error(runner("train_vqgan.py", *VQ, "--max-steps", "3", "--resume", out / "latest.pt",
                            "--out-dir", out), "cannot read checkpoint")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fake a full disk")
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(runner, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    r = runner("train_vqgan.py", *VQ, "--max-steps", "3", "--resume", "auto", "--out-dir", out, fault="disk-full")
    assert_one_error(r, "No space left on device")
    assert ckpt.load(out / "latest.pt")["step"] == 2
    assert not list(out.glob(".*.tmp"))


def test_atomic_write_on_a_full_disk_raises_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    target = tmp_path / "latest.pt"
    ckpt.atomic_save({"step": 1}, target)
    from tests.forkrun import on_dev_full

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", on_dev_full(ckpt.tempfile.mkstemp))
    with pytest.raises(ckpt.DiskFullError, match="No space left on device") as e:
        ckpt.atomic_save({"step": 2, "w": torch.zeros(10_000)}, target)
    assert "\n" not in str(e.value)
    assert ckpt.load(target)["step"] == 1 and not list(tmp_path.glob(".*.tmp"))


# -------------------------------------------------------------------------------------------- the lock

def test_second_run_on_a_locked_out_dir_is_refused_naming_the_first(runner, tmp_path):
    out = tmp_path / "run"
    lock = ckpt.OutDirLock(out).acquire()  # as a first run holds it
    try:
        r = runner("train_vqgan.py", *VQ, "--max-steps", "1", "--out-dir", out)
    finally:
        lock.release()
    assert_one_error(r, f"in use by another run (PID {os.getpid()} on ")
    assert not (out / "latest.pt").exists()


def test_lock_of_a_killed_run_is_not_left_held(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.checkpoint import OutDirLock; "
                               "OutDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(out)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt.UsageError, match=f"PID {holder.pid} on "):
            ckpt.OutDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    ckpt.OutDirLock(out).acquire().release()  # the kernel let go with the process


def test_stale_temps_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".latest.pt.abc.tmp").write_bytes(b"12345")
    (tmp_path / "latest.pt").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep")  # not a hidden temporary of atomic_write
    assert ckpt.CheckpointManager(tmp_path).remove_stale_temps() == (1, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "notes.tmp"]


# ---------------------------------------------------------------------------- pictures as a viewer shows

def test_16_bit_greyscale_by_its_range(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # PIL's 16-bit mode, not L
    got = np.asarray(load_rgb(tmp_path / "grey16.png"))
    assert got.shape == (1, 4, 3) and got[0, :, 0].tolist() == [0, 64, 128, 255] and (got == got[..., :1]).all()


def test_float_tiff_by_its_range(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    got = np.asarray(load_rgb(tmp_path / "float.tiff"))
    assert got[0, :, 0].tolist() == [0, 64, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    # Stored 4 wide and 2 high, left half red, right half blue, tagged "rotate 90° clockwise to view"
    # (Orientation 6, a phone held upright): a viewer shows it 2 wide and 4 high, red on top.
    stored = np.zeros((2, 4, 3), dtype=np.uint8)
    stored[:, :2] = (255, 0, 0)
    stored[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    got = np.asarray(load_rgb(tmp_path / "phone.png"))
    assert got.shape == (4, 2, 3)
    assert (got[:2] == (255, 0, 0)).all() and (got[2:] == (0, 0, 255)).all()


def test_decode_rgb_takes_bytes_and_pil_images_alike(tmp_path):
    Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    from_bytes = decode_rgb((tmp_path / "f.tiff").read_bytes())
    from_pil = decode_rgb(Image.open(tmp_path / "f.tiff"))
    assert np.asarray(from_bytes).tolist() == np.asarray(from_pil).tolist() == [[[0] * 3, [255] * 3]]


def test_demo_caps_threads_at_the_cores(runner, tmp_path):
    r = runner("demo.py", "--text", "a red circle", "--cand-size", "2", "--out-k", "1", "--threads", "100000",
               "--out", tmp_path / "t.png", "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"using {os.cpu_count()}" in r.stderr and (tmp_path / "t.png").is_file()


def test_load_picture_decodes_as_a_viewer_shows(tmp_path):
    """demo.py --image's decoder (models.pipeline.load_picture) is the training data's: a 16-bit greyscale
    picture keeps its grey, an EXIF-rotated one comes out upright."""
    from models.pipeline import load_picture

    grey = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = load_picture(tmp_path / "g16.png", 8)
    assert abs(float(x.mean())) < 0.05                         # mid grey, not white (1.0)
    rgb = np.zeros((8, 16, 3), dtype=np.uint8)
    rgb[:, :8] = 255                                           # stored: white left half, black right half
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6                                           # Orientation: rotate 90 clockwise to view
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = load_picture(tmp_path / "rot.jpg", 8)
    assert x.shape == (1, 3, 8, 8)
    rows = x[0].mean(dim=(0, 2))                               # viewed: white on top, black at the bottom
    assert rows[:3].min() > 0.8 and rows[-3:].max() < -0.8


def test_demo_output_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves the previous picture whole and no temporary."""
    from models import pipeline

    path = tmp_path / "s.png"
    images = torch.zeros(1, 3, 8, 8)
    pipeline.save_images(images, path)
    before = path.read_bytes()

    def broken_save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ckpt.DiskFullError, match="No space left on device"):
        pipeline.save_images(images + 1, path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
