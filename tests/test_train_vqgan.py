"""train_vqgan.py run as a user runs it: training lowers the error, a SIGTERM'd run resumes to the same
weights as an uninterrupted one, 2 gloo processes equal 1 process, broken inputs end in one line."""
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO

# Small, fast runs: 8 images a step, Shapes world, no TensorBoard, 1 thread so runs are bit-reproducible.
BASE = ["--preset", "shapes", "--batch-size", "8", "--no-tensorboard", "--shapes-val-size", "16",
        "--log-every", "1", "--val-batches", "1"]


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MASTER_IP", "GROUP_RANK",
                 "GROUP_WORLD_SIZE")


def _env():
    """The test's subprocess environment: one thread each, unbuffered, and no launcher variables (the
    suite may itself run under torchrun, Slurm or hfai; a trainer must start as a plain process here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in list(env):
        if k in LAUNCHER_VARS or k.startswith(("SLURM_", "TORCHELASTIC_", "CLIPGEN_")):
            del env[k]
    return env


def interrupt_at(cmd, line_prefix: str, sig, timeout=300, env=None):
    """Run cmd (in the repo, unbuffered); send `sig` when a stdout line starts with line_prefix, then wait.
    Returns (returncode, all of stdout, stderr): how the signal tests stop a trainer mid-run."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_prefix):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + out, err


def run_train(args, timeout=300, prefix=None):
    cmd = (prefix or [sys.executable]) + ["train_vqgan.py", *BASE, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), \
                (k, (a[k].float() - b[k].float()).abs().max().item())


def test_short_shapes_run_lowers_reconstruction_error(tmp_path):
    r = run_train(["--max-steps", "60", "--val-every", "60", "--lr", "1e-3", "--warmup-steps", "5",
                   "--num-workers", "0", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    pixel = [float(m) for m in re.findall(r"^step \d+/60 loss \S+ pixel (\S+)", r.stdout, re.M)]
    assert len(pixel) == 60
    assert np.mean(pixel[-5:]) < 0.5 * np.mean(pixel[:5]), pixel
    done = [l for l in r.stdout.splitlines() if l.startswith("done:")]
    assert len(done) == 1 and "val PSNR" in done[0]
    assert (tmp_path / "latest.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert (tmp_path / "recon.png").is_file()
    with Image.open(tmp_path / "recon.png") as im:  # inputs above reconstructions: two rows of 64 px
        assert im.height > 2 * 64
    state = load_state(tmp_path / "latest.pt")
    assert state["kind"] == "vqgan" and state["step"] == 60
    for key in ("model", "discriminator", "opt_g", "opt_d", "scaler", "rng", "config", "epoch"):
        assert key in state


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    # 40 training images = 5 steps an epoch, so the runs cross epochs; the GAN switches on at step 3 and
    # a high restart threshold makes the quantizer re-seed codes: every piece of state must survive.
    common = ["--max-steps", "14", "--shapes-train-size", "40", "--disc-start", "3", "--disc-weight", "0.5",
              "--restart-threshold", "0.999", "--val-every", "5", "--save-every", "100", "--num-workers", "1"]
    full = run_train(common + ["--out-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    out = tmp_path / "cut"
    rc, stdout, stderr = interrupt_at([sys.executable, "train_vqgan.py", *BASE, *common, "--out-dir", str(out)],
                                      "step 4/14", signal.SIGTERM)
    assert rc == 0, stderr
    assert "received SIGTERM" in stdout
    stopped_at = load_state(out / "latest.pt")["step"]
    assert 4 <= stopped_at < 14

    resumed = run_train(common + ["--out-dir", str(out), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {stopped_at}" in resumed.stdout
    a, b = load_state(tmp_path / "full" / "latest.pt"), load_state(out / "latest.pt")
    assert a["step"] == b["step"] == 14
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["discriminator"], b["discriminator"])
    assert a["opt_g"]["state"].keys() == b["opt_g"]["state"].keys()
    for k in a["opt_g"]["state"]:
        assert_same_tensors(a["opt_g"]["state"][k], b["opt_g"]["state"][k])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    # The GAN is on from step 2, so the adaptive weight's cross-rank averaging is exercised too. Codebook
    # restarts are off here: they hinge on argmin near-ties that float noise can flip; their cross-rank
    # agreement is tested exactly in test_quantizer_restart_is_identical_across_ranks.
    common = ["--max-steps", "4", "--disc-start", "2", "--disc-weight", "0.5", "--restart-threshold", "0",
              "--lr", "1e-3", "--warmup-steps", "0", "--val-every", "4", "--num-workers", "0",
              "--device", "cpu", "--precision", "fp32"]
    one = run_train(common + ["--out-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    two = run_train(common + ["--out-dir", str(tmp_path / "two")], prefix=torchrun)
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stdout
    a, b = load_state(tmp_path / "one" / "latest.pt"), load_state(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "discriminator"):
        diff = torch.cat([(a[part][k].float() - b[part][k].float()).abs().flatten() for k in a[part]])
        # Equal up to float summation order. Adam turns the pure-noise gradient of a bias that a
        # GroupNorm cancels into a full-size step, so a handful of elements may differ by up to the
        # summed learning rate (4e-3); here ~0.1% of elements do. A real difference moves most elements:
        # one process on a batch of 4 instead of 8 differs from it in 99% (model) and 82% (discriminator).
        assert diff.max() <= 4e-3 + 1e-6, part
        assert (diff > 1e-5).float().mean() < 1e-2, (part, (diff > 1e-5).sum().item(), diff.numel())


def test_corrupt_image_in_folder_is_skipped_and_reported(tmp_path):
    data = tmp_path / "imgs" / "sub"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    (data / "07.png").write_bytes(b"not a png at all")
    r = run_train(["--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--val-fraction", "0.1",
                   "--max-steps", "6", "--val-every", "6", "--num-workers", "0",
                   "--out-dir", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert "07.png" in r.stderr  # the warning names the file
    done = [l for l in r.stdout.splitlines() if l.startswith("done:")][0]
    assert int(re.search(r"skipped images (\d+)", done).group(1)) >= 1


@pytest.mark.parametrize("args,needle", [
    (["--resume", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    (["--dataset", "folder"], "--data-path"),
    (["--dataset", "folder", "--data-path", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_user_errors_end_in_one_line(tmp_path, args, needle):
    r = run_train(args + ["--max-steps", "1", "--out-dir", str(tmp_path)], timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and needle in last, r.stderr


def test_resume_refuses_a_checkpoint_of_another_kind(tmp_path):
    torch.save({"kind": "gpt", "model": {}}, tmp_path / "gpt.pt")
    r = run_train(["--resume", str(tmp_path / "gpt.pt"), "--max-steps", "1", "--out-dir", str(tmp_path)],
                  timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "not a VQGAN" in r.stderr.strip().splitlines()[-1]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from engine.checkpoint import atomic_save

    target = tmp_path / "latest.pt"
    atomic_save({"step": 1}, target)

    def explode(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, target)
    monkeypatch.undo()
    assert load_state(target) == {"step": 1}  # the good checkpoint is still there, whole
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left behind


def test_channels_last_trains_like_contiguous_and_resumes_across_layouts(tmp_path):
    # fp32 so the two layouts differ by summation order only. Weights agree to float noise; the quantizer's
    # code-usage statistics may differ where a near-tie picks another code.
    common = ["--shapes-train-size", "40", "--disc-start", "2", "--disc-weight", "0.5", "--val-every", "100",
              "--save-every", "3", "--num-workers", "0", "--precision", "fp32"]
    runs = {"nhwc": ["--max-steps", "6"], "nchw": ["--max-steps", "6", "--no-channels-last"]}
    for name, extra in runs.items():
        r = run_train(common + extra + ["--out-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr
    # A channels-last run cut at step 3 and resumed contiguous (the checkpoint does not fix the layout).
    r = run_train(common + ["--max-steps", "3", "--out-dir", str(tmp_path / "mixed")])
    assert r.returncode == 0, r.stderr
    r = run_train(common + ["--max-steps", "6", "--no-channels-last", "--resume", "auto",
                            "--out-dir", str(tmp_path / "mixed")])
    assert r.returncode == 0 and "resuming at step 3" in r.stdout, r.stderr
    ref = load_state(tmp_path / "nchw" / "latest.pt")
    assert ref["step"] == 6
    for name in ("nhwc", "mixed"):
        got = load_state(tmp_path / name / "latest.pt")
        assert got["step"] == 6
        weights = {k: v for k, v in got["model"].items() if k != "quantize.usage"}
        assert_same_tensors(weights, {k: ref["model"][k] for k in weights}, atol=1e-4)
        assert_same_tensors(got["discriminator"], ref["discriminator"], atol=1e-4)
        # Summation-order noise moves few elements (measured ~1e-6 on average); Adam moments paired with
        # the wrong elements after a cross-layout resume moved most of them (~2e-5: the bug this caught).
        diffs = torch.cat([(weights[k].float() - ref["model"][k].float()).abs().flatten() for k in weights])
        assert diffs.mean() < 5e-6, (name, diffs.mean().item())
    # The layouts really differ: the channels-last run's checkpoint holds NHWC-strided conv weights.
    w = load_state(tmp_path / "nhwc" / "latest.pt")["model"]["encoder.conv_in.weight"]
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


@pytest.mark.slow  # ~2-3 min: torch.compile's one-off compile of the VQGAN on a CPU
def test_compile_flag_trains_like_eager(tmp_path):
    common = ["--shapes-train-size", "40", "--max-steps", "3", "--disc-start", "1", "--disc-weight", "0.5",
              "--val-every", "100", "--save-every", "3", "--num-workers", "0", "--precision", "fp32"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        r = run_train(common + extra + ["--out-dir", str(tmp_path / name)], timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (load_state(tmp_path / n / "latest.pt") for n in ("eager", "compiled"))
    assert a["model"].keys() == b["model"].keys()          # no torch.compile "_orig_mod." prefixes
    weights = {k: v for k, v in b["model"].items() if k != "quantize.usage"}
    assert_same_tensors(weights, {k: a["model"][k] for k in weights}, atol=1e-4)
