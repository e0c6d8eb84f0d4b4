"""The flow-matching prior (models/flow.py): its latent space and ODE do what they say, sampling is seeded,
train_gpt.py --model flow trains it (loss falls, resume is exact, 2 processes equal 1), exported weights give
the same grids, and TextToImage / demo.py / evaluate.py sample it as they sample the GPT."""
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import CheckpointError
from models.convert import load_vqgan
from models.flow import FlowConfig, FlowPrior, build_flow, check_codebook, load_flow, load_prior
from models.gpt import GPT, GuidanceError
from models.vqgan import VQGAN
from tests import forkrun
from tests.conftest import REPO
from tests.test_train_vqgan import _env, _free_port, interrupt_at, load_state
from tests.tiny import TINY_CLIP, TINY_VQGAN, tiny_flow, tiny_gpt


@pytest.fixture(scope="module")
def vqgan():
    torch.manual_seed(0)
    return VQGAN(TINY_VQGAN).eval()


@pytest.fixture
def flow(vqgan):
    torch.manual_seed(1)
    return tiny_flow(vqgan).eval()


def conds(n, seed=0):
    return F.normalize(torch.randn(n, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------- the latent space

@pytest.mark.parametrize("l2", [True, False])
def test_code_vectors_snap_back_to_their_tokens(l2):
    codebook = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    codebook = F.normalize(codebook, dim=-1) if l2 else codebook
    model = build_flow("tiny", codebook, n_tokens=16, cond_dim=8, l2_codes=l2, n_layer=1, n_embd=32, n_head=2)
    tokens = torch.randint(0, 50, (5, 16))
    x = model.latents(tokens)
    assert abs(float(x.std()) - 1.0) < 0.25  # scaled to about unit variance
    assert torch.equal(model.snap(x), tokens)
    assert torch.equal(model.snap(x + 0.01 * torch.randn_like(x)), tokens)  # the nearest code
    if l2:  # the quantiser's cosine rule: a vector's length does not matter
        assert torch.equal(model.snap(3 * x), tokens)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_patches_are_squares_of_the_grid_and_invert(vqgan, patch):
    model = tiny_flow(vqgan, patch=patch)
    x = torch.arange(64.0).view(1, 64, 1).expand(1, 64, 8).contiguous()  # position index in raster order
    p = model.patchify(x)
    assert p.shape == (1, 64 // patch ** 2, patch * patch * 8)
    if patch == 2:  # the first vector holds grid cells (0,0) (0,1) (1,0) (1,1)
        assert p[0, 0, ::8].tolist() == [0.0, 1.0, 8.0, 9.0]
    assert torch.equal(model.unpatchify(p), x)
    with pytest.raises(ValueError, match="patch 3"):
        FlowConfig(n_tokens=64, patch=3)


# ------------------------------------------------------------------------------------------- the ODE

def test_zero_steps_snap_the_noise_itself(flow):
    c = conds(3)
    out = flow.sample(c, steps=0, temperature=0.5, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(3, 64, TINY_VQGAN.embed_dim, generator=torch.Generator().manual_seed(7)) * 0.5
    assert torch.equal(out, flow.snap(noise))
    assert flow.n_forwards == flow.steps == 8


@pytest.mark.parametrize("solver,steps", [("euler", 4), ("heun", 4), ("heun", 1)])
def test_solvers_integrate_a_known_velocity(flow, monkeypatch, solver, steps):
    """v(x, t) = c t: x(1) = x(0) + c / 2 exactly for Heun (the trapezoid rule is exact on a line), and
    x(0) + c (N - 1) / (2N) for N Euler steps (the left Riemann sum)."""
    c = torch.randn(64, TINY_VQGAN.embed_dim)
    calls = []

    def velocity_field(x, t, cond, cond_drop=None):
        calls.append(len(x))
        return c * t[:, None, None]

    monkeypatch.setattr(flow, "forward", velocity_field)
    monkeypatch.setattr(flow, "snap", lambda x: x)  # the ODE's end point itself
    x0 = torch.randn(2, 64, TINY_VQGAN.embed_dim, generator=torch.Generator().manual_seed(3))
    x1 = flow.sample(conds(2), steps=steps, solver=solver, generator=torch.Generator().manual_seed(3))
    want = x0 + (c / 2 if solver == "heun" else c * (steps - 1) / (2 * steps))
    assert torch.allclose(x1, want, atol=1e-5)
    assert len(calls) == steps * (2 if solver == "heun" else 1)


def test_guidance_one_is_the_conditional_velocity_alone(flow, monkeypatch):
    cond_v, null_v = torch.randn(64, TINY_VQGAN.embed_dim), torch.randn(64, TINY_VQGAN.embed_dim)
    seen = []

    def velocity_field(x, t, cond, cond_drop=None):
        seen.append((len(x), None if cond_drop is None else cond_drop.tolist()))
        drop = torch.zeros(len(x), dtype=torch.bool) if cond_drop is None else cond_drop
        return torch.where(drop[:, None, None], null_v, cond_v).expand(len(x), -1, -1)

    monkeypatch.setattr(flow, "forward", velocity_field)
    monkeypatch.setattr(flow, "snap", lambda x: x)

    def end(scale):
        return flow.sample(conds(2), steps=1, cfg_scale=scale, generator=torch.Generator().manual_seed(0))

    x0 = torch.randn(2, 64, TINY_VQGAN.embed_dim, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(end(1.0), x0 + cond_v)
    assert seen == [(2, None)]  # one call, the conditional rows only: no null batch
    assert torch.allclose(end(3.0), x0 + null_v + 3 * (cond_v - null_v), atol=1e-5)
    assert seen[1] == (4, [False, False, True, True])  # conditional and null rows in one batch


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_the_tokens_objective_flows_to_the_codes_it_predicts(vqgan, monkeypatch, solver):
    """Logits certain of a grid: the velocity (E[x1] - x) / (1 - t) carries any x to those codes' vectors, the
    result is the grid, and Heun skips its correction at t = 1 (where 1 - t is 0): 2N - 1 calls."""
    model = tiny_flow(vqgan, objective="tokens", steps=3, solver=solver).eval()
    target = torch.randint(0, TINY_VQGAN.n_codes, (2, 64), generator=torch.Generator().manual_seed(4))
    logits = F.one_hot(target, TINY_VQGAN.n_codes).float() * 50
    calls = []

    def certain(x, t, cond, cond_drop=None):
        calls.append(float(t[0]))
        return logits

    monkeypatch.setattr(model, "forward", certain)
    assert torch.equal(model.sample(conds(2)), target)
    assert len(calls) == model.n_forwards == (5 if solver == "heun" else 3) and max(calls) < 1
    x = torch.randn(2, 64, TINY_VQGAN.embed_dim)
    v = model.to_velocity(logits, x, torch.full((2,), 0.25))
    assert torch.allclose(x + 0.75 * v, model.latents(target), atol=1e-4)
    assert torch.equal(model.estimate(logits, x, torch.zeros(2)), target)
    loss = model.objective_loss(logits, target, model.latents(target), x)
    assert float(loss) < 1e-6 and model.out.out_features == 4 * TINY_VQGAN.n_codes


def test_sampling_is_seeded(flow):
    torch.manual_seed(5)
    flow.out.weight.data.normal_(0, 0.5)  # a non-zero velocity: the network's output matters
    c = conds(4)
    a = flow.sample(c, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    b = flow.sample(c, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    other = flow.sample(c, generator=torch.Generator().manual_seed(2), cfg_scale=2.0)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert not torch.equal(a, flow.sample(c, steps=0, generator=torch.Generator().manual_seed(1)))


def test_what_token_sampling_means_is_refused(flow, vqgan):
    c = conds(1)
    for kw, needle in (({"top_k": 5}, "top-k"), ({"top_p": 0.9}, "top-k and top-p"),
                       ({"first_tokens": torch.zeros(1, 3, dtype=torch.long)}, "whole grids"),
                       ({"temperature": 0.0}, "temperature"), ({"solver": "rk4"}, "solver")):
        with pytest.raises(ValueError, match=needle):
            flow.sample(c, **kw)
    untrained = tiny_flow(vqgan, null_cond_trained=False)
    with pytest.raises(GuidanceError, match="--cond-drop 0"):
        untrained.sample(c, cfg_scale=2.0)


# ------------------------------------------------------------------------------------------- loading

def test_load_prior_reads_either_kind_and_the_codebook_must_match(flow, vqgan, tmp_path):
    from engine.checkpoint import save_weights

    gpt = tiny_gpt()
    torch.save({"kind": "gpt", "config": gpt.cfg.to_dict(), "model": gpt.state_dict()}, tmp_path / "gpt.pt")
    torch.save({"kind": "flow", "config": flow.cfg.to_dict(), "model": flow.state_dict()}, tmp_path / "flow.pt")
    save_weights(tmp_path / "flow.safetensors", "flow", flow.cfg.to_dict(), flow.state_dict())
    assert isinstance(load_prior(tmp_path / "gpt.pt"), GPT)
    for name in ("flow.pt", "flow.safetensors"):
        loaded = load_prior(tmp_path / name)
        assert isinstance(loaded, FlowPrior) and loaded.cfg == flow.cfg
        check_codebook(loaded, vqgan)  # fp16 storage is close enough
    with pytest.raises(CheckpointError, match="is a GPT, not a flow prior"):
        load_flow(tmp_path / "gpt.pt")
    torch.manual_seed(9)
    with pytest.raises(ValueError, match="another VQGAN's codes"):
        check_codebook(flow, VQGAN(TINY_VQGAN))
    torch.save({"kind": "flow", "config": {**flow.cfg.to_dict(), "patch": 3}, "model": flow.state_dict()},
               tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: bad 'config'"):
        load_prior(tmp_path / "bad.pt")


def test_the_pipeline_samples_a_flow_prior_as_it_samples_the_gpt(flow, vqgan, tmp_path):
    from models.clip import load_clip
    from models.pipeline import TextToImage
    from tests.tiny import write_tiny

    clip = load_clip(str(write_tiny(tmp_path, gpt=False) / "clip.pt"))
    flow.out.weight.data.normal_(0, 0.5)
    flow.steps = 3
    pipe = TextToImage(vqgan, flow, clip, "cpu")
    done = []
    gen = pipe.generate(conds(1)[0], n_candidates=5, keep=2, seed=4, progress=done.append, batch_size=3)
    assert gen.images.shape == (2, 3, 64, 64) and gen.tokens.shape == (2, 8, 8)
    assert gen.scores[0] >= gen.scores[1]
    assert done[-1] == 5 and 0 < done[0] < 3  # network calls reported as they happen, then each batch
    again = pipe.generate(conds(1)[0], n_candidates=5, keep=2, seed=4, batch_size=3)
    assert torch.equal(gen.tokens, again.tokens)
    bf16 = TextToImage(vqgan, tiny_flow(vqgan), clip, "cpu", precision="bf16")
    assert bf16.gpt.inp.weight.dtype == torch.bfloat16 and bf16.gpt.codebook.dtype == torch.float32


# ----------------------------------------------------------------------------- train_gpt.py --model flow

def run_flow(frozen, args, prefix=None, timeout=300):
    cmd = [
        "train_gpt.py", "--model", "flow", "--vqgan", str(frozen / "vqgan.pt"), "--clip", str(frozen / "clip.pt"),
        "--shards", str(frozen / "enc-unlabeled"), "--batch-size", "8", "--no-tensorboard", "--log-every", "1",
        "--num-workers", "0", "--prompts", "a red circle", "--warmup-steps", "2", "--flow-steps", "2", *args]
    if prefix is None:  # through the fork server (tests/forkrun.py)
        return forkrun.run(*cmd, timeout=timeout)
    return subprocess.run(prefix + cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_flow_loss_falls_resume_is_exact_and_export_samples_the_same(frozen, tmp_path):
    common = ["--max-steps", "24", "--lr", "2e-3", "--embed-noise", "0.2", "--cond-drop", "0.3", "--val-every", "12",
              "--save-every", "100", "--sample-every", "24"]
    full = run_flow(frozen, common + ["--out-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    assert "flow tiny" in full.stdout and (tmp_path / "full" / "samples.png").is_file()
    losses = [float(line.split()[3]) for line in full.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 24
    assert 1.5 < losses[0] < 2.5  # a zero velocity at the start: E|x1 - x0|^2 = 1 + 1 per dimension
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0], losses
    state = load_state(tmp_path / "full" / "latest.pt")
    assert state["kind"] == "flow" and state["config"]["steps"] == 2 and state["config"]["null_cond_trained"]
    assert "ema" in state and "optimizer" in state

    cmd = [sys.executable, "train_gpt.py", "--model", "flow", "--vqgan", str(frozen / "vqgan.pt"), "--clip",
           str(frozen / "clip.pt"), "--shards", str(frozen / "enc-unlabeled"), "--batch-size", "8", "--no-tensorboard",
           "--log-every", "1", "--num-workers", "0", "--prompts", "a red circle", "--warmup-steps", "2",
           "--flow-steps", "2", *common, "--out-dir", str(tmp_path / "cut")]
    rc, stdout, stderr = interrupt_at(cmd, "step 4/24", signal.SIGTERM)
    assert rc == 0 and "received SIGTERM" in stdout, stderr
    assert 4 <= load_state(tmp_path / "cut" / "latest.pt")["step"] < 24
    resumed = run_flow(frozen, common + ["--out-dir", str(tmp_path / "cut"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    cut = load_state(tmp_path / "cut" / "latest.pt")
    for part in ("model", "ema"):
        for k in state[part]:
            assert torch.equal(state[part][k], cut[part][k]), (part, k)

    out = tmp_path / "flow.safetensors"
    r = subprocess.run([sys.executable, "export.py", str(tmp_path / "full" / "latest.pt"), str(out), "--dtype", "fp32"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "flow" in r.stdout, r.stderr
    a, b = load_prior(tmp_path / "full" / "latest.pt"), load_prior(out)
    c = conds(6)
    for scale in (1.0, 2.5):
        ta = a.sample(c, cfg_scale=scale, generator=torch.Generator().manual_seed(3))
        tb = b.sample(c, cfg_scale=scale, generator=torch.Generator().manual_seed(3))
        assert torch.equal(ta, tb)
    assert len(ta.unique()) > 1


def test_flow_two_gloo_processes_equal_one_process(frozen, tmp_path):
    # Times, noise and condition drops are drawn per global batch (train_gpt.flow_draws, null_rows): the same
    # whatever the number of processes.
    common = ["--max-steps", "4", "--embed-noise", "0", "--cond-drop", "0.5", "--dropout", "0", "--val-every", "4",
              "--sample-every", "0", "--device", "cpu", "--precision", "fp32"]
    one = run_flow(frozen, common + ["--out-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    two = run_flow(frozen, common + ["--out-dir", str(tmp_path / "two")], prefix=torchrun)
    assert two.returncode == 0, two.stderr
    a, b = load_state(tmp_path / "one" / "latest.pt"), load_state(tmp_path / "two" / "latest.pt")
    from tests.compare import assert_states_match
    for part in ("model", "ema"):
        assert_states_match(a[part], b[part], part, bound=4 * 6e-4)


def test_flow_draws_split_the_global_draw_over_ranks():
    from types import SimpleNamespace

    from train_gpt import flow_draws

    whole = flow_draws(3, 11, SimpleNamespace(rank=0, world_size=1), 8, (4, 2), "logit-normal", "cpu")
    halves = [flow_draws(3, 11, SimpleNamespace(rank=r, world_size=2), 4, (4, 2), "logit-normal", "cpu")
              for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    assert ((whole[0] > 0) & (whole[0] < 1)).all()
    assert not torch.equal(whole[0], flow_draws(3, 12, SimpleNamespace(rank=0, world_size=1), 8, (4, 2),
                                                "logit-normal", "cpu")[0])


# ------------------------------------------------------------------------- demo.py and evaluate.py, as run

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """vqgan/gpt/clip/flow.safetensors of tiny random models, as export.py writes them."""
    from export import export
    from tests.tiny import write_tiny

    root = write_tiny(tmp_path_factory.mktemp("flowfolder"))
    torch.manual_seed(2)
    flow = tiny_flow(load_vqgan(root / "vqgan.pt"), steps=3)
    flow.out.weight.data.normal_(0, 0.5)
    torch.save({"kind": "flow", "config": flow.cfg.to_dict(), "model": flow.state_dict()}, root / "flow.pt")
    for kind in ("vqgan", "gpt", "clip", "flow"):
        export(root / f"{kind}.pt", root / f"{kind}.safetensors", dtype=torch.float32)
    return root


def test_demo_draws_with_the_flow_prior(forkrun, folder, tmp_path):
    from tests.conftest import assert_one_error

    base = ["--models", folder, "--prior", "flow", "--cand-size", "4", "--out-k", "2", "--device", "cpu"]
    r = forkrun("demo.py", *base, "--text", "a red circle", "--flow-steps", "2", "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    assert "prior: flow, 2 euler steps (2 network calls per candidate)" in r.stdout
    assert "top-k" not in r.stdout.splitlines()[1]  # no token filter is claimed for a flow prior
    assert (tmp_path / "a.png").is_file() and (tmp_path / "a_1.png").is_file()
    r = forkrun("demo.py", *base, "--interpolate", "a red circle", "a blue square", "--steps", "3",
                "--flow-solver", "heun", "--out", tmp_path / "strip.png")
    assert r.returncode == 0 and "3 heun steps" in r.stdout, r.stderr
    assert (tmp_path / "strip_2.png").is_file()
    # --gpt PATH may name a flow file itself
    r = forkrun("demo.py", "--vqgan", folder / "vqgan.pt", "--gpt", folder / "flow.pt", "--clip", folder / "clip.pt",
                "--text", "a red circle", "--cand-size", "2", "--out-k", "1", "--out", tmp_path / "b.png")
    assert r.returncode == 0 and "prior: flow, 3 euler steps" in r.stdout, r.stderr
    assert_one_error(forkrun("demo.py", *base, "--text", "x", "--top-k", "5", "--out", tmp_path / "c.png"),
                     "--top-k filters a GPT's token distribution")
    import shutil

    no_flow = tmp_path / "no-flow"
    no_flow.mkdir()
    for kind in ("vqgan", "gpt", "clip"):
        shutil.copy(folder / f"{kind}.safetensors", no_flow)
    assert_one_error(forkrun("demo.py", "--models", no_flow, "--prior", "flow", "--text", "x", "--out",
                             tmp_path / "d.png"), "flow.safetensors not found (the flow prior of --models")


def test_evaluate_measures_a_flow_prior_and_says_so(forkrun, folder, tmp_path):
    import json

    out = tmp_path / "r.json"
    r = forkrun("evaluate.py", "--vqgan", folder / "vqgan.safetensors", "--gpt", folder / "flow.safetensors",
                "--clip", folder / "clip.safetensors", "--prompts", "3", "--samples", "2", "--fd-real", "0",
                "--flow-steps", "1", "--cfg-scale", "2", "--device", "cpu", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["prior"] == {"kind": "flow", "steps": 1, "solver": "euler", "n_forwards": 1}
    assert result["prompts"] == 3 and 0 <= result["raw"]["all"] <= 1


def test_variations_and_interpolation_take_the_flow_prior(folder):
    from PIL import Image

    from models.pipeline import TextToImage

    pipe = TextToImage.from_folder(folder, device="cpu", prior="flow")
    assert isinstance(pipe.gpt, FlowPrior) and pipe.gpt.steps == 3
    picture = Image.new("RGB", (80, 64), (200, 30, 30))
    a = pipe.variations(picture, n_candidates=3, keep=2, seed=1)
    assert torch.equal(a.tokens, pipe.variations(picture, n_candidates=3, keep=2, seed=1).tokens)
    strip = pipe.interpolate("a red circle", "a blue square", steps=3, seed=0)
    assert strip.images.shape[0] == 3
    with pytest.raises(ValueError, match="prior 'diffusion'"):
        TextToImage.from_folder(folder, prior="diffusion")


def test_export_sets_a_flow_priors_default_sampling_and_refuses_it_for_a_gpt(forkrun, folder, tmp_path):
    from tests.conftest import assert_one_error

    r = forkrun("export.py", folder / "flow.pt", tmp_path / "f.safetensors", "--flow-steps", "16", "--flow-solver", "heun")
    assert r.returncode == 0, r.stderr
    prior = load_prior(tmp_path / "f.safetensors")
    assert (prior.steps, prior.solver, prior.cfg.steps) == (16, "heun", 16)
    assert_one_error(forkrun("export.py", folder / "gpt.pt", tmp_path / "g.safetensors", "--flow-steps", "2"),
                     "are for a flow prior")
