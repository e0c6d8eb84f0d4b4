"""train_vqgan.py run as a user runs it: training lowers the error, a SIGTERM'd run resumes to the same
weights as an uninterrupted one, 2 gloo processes equal 1 process, broken inputs end in one line."""
import math
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

from tests import forkrun
from tests.compare import assert_states_match
from tests.conftest import COMPAT_DIR, REPO

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
    """`python train_vqgan.py BASE args` (through the fork server: tests/forkrun.py), or under prefix."""
    if prefix is None:
        return forkrun.run("train_vqgan.py", *BASE, *args, timeout=timeout)
    cmd = prefix + ["train_vqgan.py", *BASE, *args]
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
    # 20 steps are enough to more than halve the pixel loss (it falls ~4x: 1.24 over the first five steps,
    # 0.35 over the last five), so a run that does not learn fails.
    r = run_train(["--max-steps", "20", "--val-every", "20", "--lr", "1e-3", "--warmup-steps", "5",
                   "--num-workers", "0", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    pixel = [float(m) for m in re.findall(r"^step \d+/20 loss \S+ pixel (\S+)", r.stdout, re.M)]
    assert len(pixel) == 20
    assert np.mean(pixel[-5:]) < 0.5 * np.mean(pixel[:5]), pixel
    done = [l for l in r.stdout.splitlines() if l.startswith("done:")]
    assert len(done) == 1 and "val PSNR" in done[0]
    assert (tmp_path / "latest.pt").is_file() and (tmp_path / "best.pt").is_file()
    assert (tmp_path / "recon.png").is_file()
    with Image.open(tmp_path / "recon.png") as im:  # inputs above reconstructions: two rows of 64 px
        assert im.height > 2 * 64
    state = load_state(tmp_path / "latest.pt")
    assert state["kind"] == "vqgan" and state["step"] == 20
    for key in ("model", "discriminator", "opt_g", "opt_d", "scaler", "rng", "config", "epoch"):
        assert key in state


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    # 20 training images at 4 a step = 5 steps an epoch, so the runs cross epochs; the GAN switches on at
    # step 3 and a high restart threshold makes the quantizer re-seed codes: every piece of state must survive.
    common = ["--max-steps", "14", "--batch-size", "4", "--shapes-train-size", "20", "--disc-start", "3",
              "--disc-weight", "0.5",
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
        # Each tensor on its own (tests/compare.py): equal up to float summation order, but for Adam's odd
        # flipped element, at most the summed learning rate (4e-3) away (measured: up to 0.8% of a
        # discriminator tensor's elements, none of the VQGAN's). A tensor left out of the all-reduce
        # differs in 25-50% of its elements (measured on decoder.norm_out.bias and the discriminator's
        # main.6.bias), which the old check over all elements pooled let pass.
        assert_states_match(a[part], b[part], part, bound=4e-3 + 1e-6)


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
    (["--init-from", "/nonexistent/vqgan.pt"], "not found"),
    (["--init-from", str(COMPAT_DIR / "clipgen_gpt_small.pt")], "not a VQGAN checkpoint"),
    (["--init-from", str(COMPAT_DIR / "clipgen_vqgan_small.pt"), "--n-codes", "128"], "drop --n-codes"),
])
def test_user_errors_end_in_one_line(forkrun, tmp_path, args, needle):
    from tests.conftest import assert_one_error

    assert_one_error(forkrun("train_vqgan.py", *BASE, *args, "--max-steps", "1", "--out-dir", tmp_path), needle)


def test_resume_refuses_a_checkpoint_of_another_kind(forkrun, tmp_path):
    from tests.conftest import assert_one_error

    torch.save({"kind": "gpt", "model": {}}, tmp_path / "gpt.pt")
    r = forkrun("train_vqgan.py", *BASE, "--resume", tmp_path / "gpt.pt", "--max-steps", "1", "--out-dir", tmp_path)
    assert_one_error(r, "not a VQGAN")


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


# --- fine-tuning (--init-from) and fp16 -------------------------------------------------------------------------
# The compatibility fixtures' VQGANs are small (32 px, 64 codes): a few steps take seconds.

SMALL = ["--batch-size", "4", "--shapes-train-size", "16", "--shapes-val-size", "4", "--val-every", "2",
         "--num-workers", "0"]


def _losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step \d+/\d+ loss (\S+)", stdout, re.M)]


@pytest.mark.parametrize("name", ["clipgen_vqgan_small.pt", "taming_vqgan_small.ckpt", "taming_vqgan_lightning.ckpt",
                                  "exported.safetensors"])
def test_init_from_trains_the_files_weights_from_step_0(tmp_path, name):
    """CLIP-GEN, taming (plain and Lightning) and exported files: the model and its config come from the file,
    the optimizer and step count start afresh. At lr 0 the weights trained are exactly the file's."""
    from engine.checkpoint import save_weights
    from models.convert import load_vqgan

    src = COMPAT_DIR / name
    if name == "exported.safetensors":  # what export.py writes: our own model, weights and config only
        model = load_vqgan(COMPAT_DIR / "clipgen_vqgan_small.pt")
        save_weights(src := tmp_path / name, "vqgan", model.cfg.to_dict(), model.state_dict(), dtype=None)
    r = run_train(["--init-from", str(src), "--max-steps", "2", "--lr", "0", "--warmup-steps", "0", *SMALL,
                   "--out-dir", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert f"fine-tuning {src}" in r.stdout
    assert re.findall(r"^step (\d+)/2 ", r.stdout, re.M) == ["1", "2"]
    assert all(np.isfinite(_losses(r.stdout))) and len(_losses(r.stdout)) == 2
    state, want = load_state(tmp_path / "out" / "latest.pt"), load_vqgan(src)
    assert state["step"] == 2 and state["config"] == want.cfg.to_dict()
    assert {int(s["step"]) for s in state["opt_g"]["state"].values()} == {2}  # a fresh optimizer: 2 steps
    assert_same_tensors(state["model"], want.state_dict())


def test_init_from_fine_tunes_and_a_resumed_run_continues_instead(tmp_path):
    src, out = COMPAT_DIR / "clipgen_vqgan_small.pt", str(tmp_path / "out")
    common = ["--init-from", str(src), "--lr", "1e-3", "--warmup-steps", "0", *SMALL, "--out-dir", out]
    r = run_train(common + ["--max-steps", "2"])
    assert r.returncode == 0, r.stderr
    assert all(np.isfinite(_losses(r.stdout)))
    from models.convert import load_vqgan

    start = load_vqgan(src).state_dict()
    after = load_state(tmp_path / "out" / "latest.pt")["model"]
    assert not torch.equal(after["decoder.conv_out.weight"], start["decoder.conv_out.weight"])  # it trained
    # A requeued job repeats its command: the run's own checkpoint wins over --init-from.
    r = run_train(common + ["--max-steps", "3", "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resuming at step 2 (--init-from" in r.stdout and "ignored" in r.stdout
    assert re.findall(r"^step (\d+)/3 ", r.stdout, re.M) == ["3"]


def test_fp16_trains_both_optimizers_under_one_loss_scale(tmp_path):
    r = run_train(["--init-from", str(COMPAT_DIR / "clipgen_vqgan_small.pt"), "--precision", "fp16", "--max-steps",
                   "3", "--disc-start", "1", "--disc-weight", "0.5", *SMALL, "--batch-size", "2", "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert "in fp16" in r.stdout and all(np.isfinite(_losses(r.stdout)))
    state = load_state(tmp_path / "latest.pt")
    scaler = state["scaler"]  # saved for the resume ({} would mean no scaler ran)
    assert scaler["scale"] <= 2.0 ** 16 and scaler["_growth_tracker"] >= 1
    # Both networks stepped under the one scale: each step of 3 (generator) and of 2 (discriminator, from step
    # 2) but those the scaler skipped because their gradients overflowed (each halved the scale once).
    overflowed = round(math.log2(2.0 ** 16 / scaler["scale"]))
    (g_steps,) = {int(s["step"]) for s in state["opt_g"]["state"].values()}
    (d_steps,) = {int(s["step"]) for s in state["opt_d"]["state"].values()}
    assert 3 - overflowed <= g_steps <= 3 and 2 - overflowed <= d_steps <= 2 and d_steps >= 1


def test_two_processes_count_the_corrupt_images_one_process_counts(tmp_path):
    """Each rank skips the broken files of its own share of a batch; the run's count (logs, checkpoint, done
    line) is their sum: the same as one process reading the same global batches."""
    data = tmp_path / "imgs" / "sub"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
    for i in (3, 7, 8, 12, 16):
        (data / f"{i:02d}.png").write_bytes(b"not a png at all")
    common = ["--init-from", str(COMPAT_DIR / "clipgen_vqgan_small.pt"), "--dataset", "folder", "--data-path",
              str(tmp_path / "imgs"), "--val-fraction", "0.1", "--batch-size", "8", "--max-steps", "2",
              "--val-every", "2", "--num-workers", "0", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    counts = []
    for name, prefix in (("one", None), ("two", torchrun)):
        r = run_train(common + ["--out-dir", str(tmp_path / name)], prefix=prefix)
        assert r.returncode == 0, r.stderr[-3000:]
        done = [line for line in r.stdout.splitlines() if line.startswith("done:")][0]
        counts.append((int(re.search(r"skipped images (\d+)", done).group(1)),
                       load_state(tmp_path / name / "latest.pt")["skipped_images"]))
    assert counts[0][0] >= 2 and counts[0] == (counts[0][0],) * 2, counts
    assert counts[1] == counts[0], counts
