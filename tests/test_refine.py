"""Test-time refinement (models/refine.py): the loss falls, grids stay grids, 0 steps is the identity,
seeds repeat, bad settings are one line; and its wiring into TextToImage, demo.py and evaluate.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import UsageError
from models.pipeline import TextToImage
from models.refine import RefineConfig, refine

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "pretrained" / "shapes"
PROMPT = "a small purple square in the top left"


@pytest.fixture(scope="module")
def pipe():
    return TextToImage.from_folder(SHAPES, device="cpu")


@pytest.fixture(scope="module")
def start(pipe):
    """4 candidates of the shipped Shapes GPT for PROMPT, and the prompt's embedding."""
    cond = pipe.clip.encode_text([PROMPT])[0]
    _, tokens = pipe.sample(cond, 4, seed=0)
    return tokens, cond


def clip_scores(pipe, tokens, cond) -> torch.Tensor:
    return pipe.clip.encode_image(pipe.decode(tokens)) @ cond


def test_clip_score_rises_on_a_fixed_prompt(pipe, start):
    tokens, cond = start
    trace = []
    out = refine(pipe.vqgan, pipe.clip, tokens, cond, RefineConfig(steps=12, lr=0.1), scores_out=trace)
    assert len(trace) == 13
    assert max(trace[1:]) > trace[0] + 1e-3          # the steps climb CLIP's score
    before, after = clip_scores(pipe, tokens, cond), clip_scores(pipe, out, cond)
    assert (after >= before - 1e-5).all()            # without a prior the best step is kept: never worse
    assert after.mean() > before.mean() + 1e-3
    assert (out != tokens).any()


def test_continuous_refinement_loss_falls(pipe, start):
    tokens, cond = start
    trace = []
    refine(pipe.vqgan, pipe.clip, tokens, cond, RefineConfig(steps=8, lr=0.05, views=1, quantize="final"),
           scores_out=trace)
    assert trace[-1] > trace[0] + 1e-3


@pytest.mark.parametrize("quantize", ["st", "final"])
def test_result_is_a_valid_token_grid(pipe, start, quantize):
    tokens, cond = start
    out = refine(pipe.vqgan, pipe.clip, tokens, cond, RefineConfig(steps=3, lr=0.2, noise=0.1, quantize=quantize))
    assert out.shape == tokens.shape and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < pipe.vqgan.cfg.n_codes


def test_zero_steps_is_the_identity(pipe, start):
    tokens, cond = start
    assert refine(pipe.vqgan, pipe.clip, tokens, cond, RefineConfig(steps=0)) is tokens
    plain = pipe(PROMPT, n_candidates=8, keep=2, seed=3)
    off = pipe(PROMPT, n_candidates=8, keep=2, seed=3, refine=RefineConfig(steps=0))
    assert torch.equal(plain.tokens, off.tokens) and torch.equal(plain.images, off.images)


def test_a_tiny_max_move_keeps_every_token(pipe, start):
    tokens, cond = start
    out = refine(pipe.vqgan, pipe.clip, tokens, cond, RefineConfig(steps=4, lr=0.5, max_move=1e-4, prior_weight=0))
    assert torch.equal(out, tokens)


def test_same_seed_same_grids(pipe, start):
    tokens, cond = start
    cfg = RefineConfig(steps=4, lr=0.1, noise=0.5, views=3, shift=3)
    a = refine(pipe.vqgan, pipe.clip, tokens, cond, cfg, seed=1)
    b = refine(pipe.vqgan, pipe.clip, tokens, cond, cfg, seed=1)
    assert torch.equal(a, b)
    one = pipe(PROMPT, n_candidates=8, keep=2, seed=5, refine=cfg)
    two = pipe(PROMPT, n_candidates=8, keep=2, seed=5, refine=cfg)
    assert torch.equal(one.images, two.images)


def test_the_prior_weight_keeps_what_the_prior_finds_likely(pipe, start):
    """With the GPT's likelihood weighed in, the grid kept is never less likely under the GPT by more than
    the CLIP score it buys; with an overwhelming weight the start (the GPT's own draw) comes back."""
    tokens, cond = start
    heavy = pipe.refine(tokens, cond, RefineConfig(steps=6, lr=0.2, prior_weight=1e6))
    assert torch.equal(heavy, tokens)
    conds = cond.view(1, -1).expand(len(tokens), -1)
    cfg = RefineConfig(steps=6, lr=0.2, prior_weight=0.02)
    out = pipe.refine(tokens, cond, cfg)
    gain = clip_scores(pipe, out, cond) - clip_scores(pipe, tokens, cond)
    loss = pipe.gpt.log_prob(tokens.flatten(1), conds) - pipe.gpt.log_prob(out.flatten(1), conds)
    assert (gain + 1e-5 >= cfg.prior_weight * loss).all()


def test_generate_refines_the_kept_and_reranks_them(pipe):
    cfg = RefineConfig(steps=12, lr=0.1, prior_weight=0)
    plain = pipe(PROMPT, n_candidates=8, keep=3, seed=0)
    refined = pipe(PROMPT, n_candidates=8, keep=3, seed=0, refine=cfg)
    assert refined.images.shape == plain.images.shape
    assert (refined.scores[:-1] >= refined.scores[1:]).all()                 # re-ranked after refinement
    assert refined.scores.mean() > plain.scores.mean()
    assert torch.allclose(pipe.decode(refined.tokens), refined.images)       # the VQGAN's image of its tokens


@pytest.mark.parametrize("kw, flag", [({"steps": -1}, "--refine-steps"), ({"lr": 0.0}, "--refine-lr"),
                                      ({"lr": float("nan")}, "--refine-lr"), ({"noise": -1.0}, "--refine-noise"),
                                      ({"views": 0}, "--refine-views"), ({"shift": -2}, "--refine-shift"),
                                      ({"max_move": 0.0}, "--refine-max-move"),
                                      ({"prior_weight": float("inf")}, "--refine-prior-weight"),
                                      ({"quantize": "round"}, "quantisation")])
def test_bad_settings_are_one_line(kw, flag):
    with pytest.raises(UsageError) as e:
        RefineConfig(**kw).check()
    assert flag in str(e.value) and "\n" not in str(e.value)


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("script, extra", [
    ("demo.py", ["--text", "a red circle", "--refine-steps", "-3"]),
    ("demo.py", ["--text", "a red circle", "--refine-steps", "2", "--refine-lr", "0"]),
    ("demo.py", ["--interpolate", "a red circle", "a blue square", "--refine-steps", "2"]),
    ("evaluate.py", ["--vqgan", "v", "--gpt", "g", "--clip", "c", "--refine-views", "0", "--refine-steps", "2"]),
    ("evaluate.py", ["--vqgan", "v", "--gpt", "g", "--clip", "c", "--refine-top", "2"]),
    ("evaluate.py", ["--vqgan", "v", "--gpt", "g", "--clip", "c", "--refine-steps", "2", "--refine-top", "99"]),
])
def test_bad_refine_flags_end_in_one_error_line(script, extra):
    r = _run(script, *extra)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refine" in errors[0], r.stderr


def test_demo_refines_from_the_command_line(tmp_path):
    out = tmp_path / "r.png"
    r = _run("demo.py", "--text", PROMPT, "--cand-size", "4", "--out-k", "2", "--refine-steps", "3",
             "--refine-prior-weight", "0", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "refined 3 steps" in r.stdout
    assert out.is_file() and (tmp_path / "r_0.png").is_file() and (tmp_path / "r_1.png").is_file()


@pytest.mark.parametrize("world", ["shapes", "scenes"])
def test_evaluate_reports_refinement_beside_the_plain_numbers(tmp_path, world):
    folder = ROOT / "pretrained" / world
    out = tmp_path / "r.json"
    extra = ["--world", "scenes", "--prompts", "1"] if world == "scenes" else ["--prompts", "3", "--fd-real", "0"]
    r = _run("evaluate.py", "--vqgan", str(folder / "vqgan.safetensors"), "--gpt", str(folder / "gpt.safetensors"),
             "--clip", str(folder / "clip.safetensors"), "--samples", "3", "--refine-steps", "2",
             "--refine-top", "2", "--json", str(out), *extra)
    assert r.returncode == 0, r.stderr
    assert "refinement: 2 steps" in r.stdout
    f = json.loads(out.read_text())["refine"]
    assert f["steps"] == 2 and f["top"] == 2
    key = "overall" if world == "scenes" else "all"
    for part in ("before", "refined", "refined_reranked"):
        assert 0.0 <= f[part][key] <= 1.0
    assert f["clip_score"]["refined"] >= f["clip_score"]["before"] - 0.05
    assert f["seconds_per_image"] > 0
