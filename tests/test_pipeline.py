"""The sampling pipeline (text -> CLIP -> GPT -> VQGAN -> CLIP re-ranking) and evaluate.py on tiny models."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from engine.cli import run
from models.gpt import GuidanceError, build_gpt
from models.pipeline import SAMPLING_PRESETS, TextToImage, default_sampling
from tests.conftest import COMPAT_DIR, REPO
from tests.tiny import TINY_CLIP, write_clipgen_mates, write_tiny
from tests.test_train_vqgan import _env


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = write_tiny(tmp_path_factory.mktemp("pipe"))
    return {k: str(root / f"{k}.pt") for k in ("vqgan", "gpt", "clip")}


def test_pipeline_reranks_and_is_reproducible(paths):
    pipe = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu")
    a = pipe("a red circle in the top left", n_candidates=6, keep=3, seed=1, batch_size=4)
    assert a.images.shape == (3, 3, 64, 64) and a.tokens.shape == (3, 8, 8)
    assert torch.all(a.scores[:-1] >= a.scores[1:])  # best first
    every = pipe("a red circle in the top left", n_candidates=6, seed=1, batch_size=4)
    assert torch.allclose(every.scores.max(), a.scores[0])  # the kept ones are the best of all candidates
    b = pipe("a red circle in the top left", n_candidates=6, keep=3, seed=1, batch_size=4)
    assert torch.equal(a.tokens, b.tokens)
    c = pipe("a red circle in the top left", n_candidates=6, keep=3, seed=2, batch_size=4)
    assert not torch.equal(a.tokens, c.tokens)


def test_pipeline_refuses_mismatched_stages(paths, tmp_path):
    from models.convert import load_vqgan
    from models.clip import load_clip

    gpt = build_gpt("tiny", vocab_size=99, n_tokens=64, cond_dim=TINY_CLIP["embed_dim"], n_layer=1, n_embd=64,
                    n_head=2)
    with pytest.raises(ValueError, match="codes"):
        TextToImage(load_vqgan(paths["vqgan"]), gpt, load_clip(paths["clip"]), device="cpu")


def test_evaluate_cli_writes_markdown_and_json(paths, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--vqgan", paths["vqgan"], "--gpt", paths["gpt"],
                        "--clip", paths["clip"], "--prompts", "3", "--samples", "4", "--device", "cpu",
                        "--json", str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| raw |" in r.stdout and "reranked" in r.stdout
    res = json.loads(out.read_text())
    assert set(res["raw"]) == {"color", "shape", "size", "position", "all"} and res["prompts"] == 3
    # Shares of 12 raw samples and of 3 kept ones; a sample is right on all attributes only if on each.
    for key, n in (("raw", 12), ("reranked", 3)):
        shares = res[key]
        assert all(abs(v * n - round(v * n)) < 1e-9 and 0 <= v <= 1 for v in shares.values()), shares
        assert shares["all"] <= min(v for a, v in shares.items() if a != "all"), shares
    assert res["clip_score"]["reranked"] >= res["clip_score"]["raw"]  # the kept sample is the best-scoring one
    assert res["clip_fd"] > 0 and res["clip_fd_real_images"] == 12  # random models' samples are no renders
    assert res["diversity"] == {}  # every attribute named


def test_evaluate_color_shape_prompts_report_unnamed_diversity(paths, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--vqgan", paths["vqgan"], "--gpt", paths["gpt"],
                        "--clip", paths["clip"], "--prompts", "2", "--samples", "3", "--named", "color+shape",
                        "--cond-source", "image", "--fd-real", "0", "--device", "cpu", "--json", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    pos = res["diversity"]["position"]
    assert set(res["diversity"]) == {"size", "position"} and pos["of"] == 9
    assert len(pos["distinct_per_prompt"]) == 2 and all(0 <= d <= 3 for d in pos["distinct_per_prompt"])
    assert pos["distinct_min"] == min(pos["distinct_per_prompt"]) and "clip_fd" not in res
    assert "unnamed position" in r.stdout and res["cond_source"] == "image"


def test_exported_weights_load_everywhere_and_give_the_same_images(paths, tmp_path):
    from export import export

    ref = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu")
    out = {}
    for kind in ("vqgan", "gpt", "clip"):
        out[kind] = str(tmp_path / f"{kind}.safetensors")
        info = export(paths[kind], out[kind], dtype=torch.float32)
        assert info["kind"] == kind
    pipe = TextToImage.from_paths(out["vqgan"], out["gpt"], out["clip"], device="cpu")
    a = ref("a red circle", n_candidates=4, seed=3)
    b = pipe("a red circle", n_candidates=4, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.images, b.images, atol=1e-6)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    half = tmp_path / "gpt16.safetensors"
    export(paths["gpt"], half)  # fp16 by default: about half the bytes
    assert half.stat().st_size < 0.6 * (tmp_path / "gpt.safetensors").stat().st_size


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    r = subprocess.run([sys.executable, "export.py", str(tmp_path / "x.pt"), str(tmp_path / "x.safetensors")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_auto_stores_large_gpts_in_bf16_where_the_cpu_packs_bf16(monkeypatch):
    """precision auto on a CPU: bf16 weights for a GPT of 10M parameters or more where oneDNN packs bf16;
    fp32 for smaller GPTs, on CPUs that do not pack bf16, and for the flow prior."""
    from models import packed
    from models.flow import FlowConfig, FlowPrior
    from models.gpt import GPT, GPTConfig
    from models.pipeline import bf16_weights_pay

    big = GPT(GPTConfig(vocab_size=16384, n_tokens=16, n_layer=2, n_head=8, n_embd=512, cond_dim=512))
    small = GPT(GPTConfig(vocab_size=1024, n_tokens=16, n_layer=2, n_head=8, n_embd=256, cond_dim=512))
    assert sum(p.numel() for p in big.parameters()) >= 10_000_000 > sum(p.numel() for p in small.parameters())
    for packs in (True, False):
        monkeypatch.setattr(packed, "supported", lambda dtype, packs=packs: packs)
        assert bf16_weights_pay(big) is packs and not bf16_weights_pay(small)
    monkeypatch.setattr(packed, "supported", lambda dtype: True)
    flow = FlowPrior(FlowConfig(n_tokens=16, latent_dim=4, cond_dim=8, n_layer=4, n_embd=512))
    assert sum(p.numel() for p in flow.parameters()) >= 10_000_000 and not bf16_weights_pay(flow)


def test_bf16_on_cpu_stores_the_gpt_in_bf16_and_auto_keeps_fp32(paths):
    """--precision bf16 on a CPU: the GPT's weights in bf16 (decode steps read half the bytes); the default
    stays fp32 for a GPT this small. Both sample valid, reproducible images."""
    fp32 = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu")
    bf16 = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu", precision="bf16")
    assert next(fp32.gpt.parameters()).dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.gpt.parameters())
    a = bf16("a red circle", n_candidates=4, keep=2, seed=3, batch_size=4)
    b = bf16("a red circle", n_candidates=4, keep=2, seed=3, batch_size=4)
    assert torch.equal(a.tokens, b.tokens) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.tokens.max() < fp32.vqgan.cfg.n_codes


# ------------------------------------------------------------------ evaluate.py's numbers on known samples

def _evaluate_on(images_for, paths, tmp_path, monkeypatch, *flags) -> dict:
    """evaluate.py's results (in process) when the sampler returns images_for(specs, samples): (P * S, 3,
    H, W) renders in prompt order, so what the judge should find is known."""
    import evaluate

    args = evaluate.parse_args(["--vqgan", paths["vqgan"], "--gpt", paths["gpt"], "--clip", paths["clip"],
                                "--fd-real", "0", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                                "--batch-size", "128", *flags])
    specs = [s for s, _ in evaluate.prompt_specs(args.prompts, evaluate.NAMED[args.named], args.seed)]
    images = images_for(specs, args.samples)

    def fake_sample_conds(self, conds, **kw):
        assert len(conds) == len(images)  # every prompt's samples in one batch (--batch-size 128)
        return images, torch.zeros(len(images), 8, 8, dtype=torch.long)

    monkeypatch.setattr(TextToImage, "sample_conds", fake_sample_conds)
    evaluate.main(args)
    return json.loads((tmp_path / "r.json").read_text())


def _renders(specs) -> torch.Tensor:
    import evaluate

    return evaluate._render_batch(specs)  # (N, 3, 64, 64) in [-1, 1]


def test_evaluate_shares_match_samples_of_known_correctness(paths, tmp_path, monkeypatch):
    """4 prompts x 4 samples: all right; all the wrong colour; all blank; 1 right + 3 blank. The shares are
    counted here from that, and the one re-ranking choice left open (right or blank for prompt 3) is read
    from CLIP scores computed here."""
    from datasets import shapes

    def images_for(specs, n):
        wrong = dataclasses.replace(specs[1], color=(specs[1].color + 1) % len(shapes.COLORS))
        blank = torch.ones(3, 64, 64)
        r = _renders([specs[0], wrong, specs[3]])
        return torch.stack([r[0]] * n + [r[1]] * n + [blank] * n + [r[2]] + [blank] * (n - 1))

    res = _evaluate_on(images_for, paths, tmp_path, monkeypatch, "--prompts", "4", "--samples", "4")
    assert res["raw"] == {"color": 5 / 16, "shape": 9 / 16, "size": 9 / 16, "position": 9 / 16, "all": 5 / 16}
    import evaluate

    pipe = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu")
    spec3, text3 = evaluate.prompt_specs(4, evaluate.NAMED["all"], 0)[3]
    feats = pipe.clip.encode_image(torch.stack([_renders([spec3])[0], torch.ones(3, 64, 64)]))
    right_kept = float((feats @ pipe.clip.encode_text([text3])[0]).argmax() == 0)
    one = (1 + right_kept) / 4  # prompt 0 and maybe prompt 3 keep a right image
    assert res["reranked"] == {"color": one, "shape": one + 0.25, "size": one + 0.25, "position": one + 0.25,
                               "all": one}


def test_evaluate_diversity_of_unnamed_attributes_is_counted_right(paths, tmp_path, monkeypatch):
    """Prompt 0's 4 samples are 4 different objects, prompt 1's one object 4 times: the distinct sizes and
    positions evaluate.py reads from the pixels are the ones counted here from the objects' labels."""
    import math

    from datasets import shapes

    others = [shapes.sample_attributes(12345, i) for i in range(4)]
    same = shapes.sample_attributes(12345, 4)

    def images_for(specs, n):
        return _renders(others + [same] * n)

    res = _evaluate_on(images_for, paths, tmp_path, monkeypatch, "--prompts", "2", "--samples", "4",
                       "--named", "color+shape")
    for attr, key in (("size", lambda s: s.size), ("position", lambda s: (s.row, s.col))):
        counts = {}
        for s in others:
            counts[key(s)] = counts.get(key(s), 0) + 1
        div = res["diversity"][attr]
        assert div["distinct_per_prompt"] == [len(counts), 1] and div["distinct_min"] == 1, (attr, div)
        entropy = -sum(c / 4 * math.log(c / 4) for c in counts.values()) / math.log(div["of"])
        assert div["entropy"] == pytest.approx(entropy / 2)  # the mean of prompt 0's and prompt 1's (0)


# ------------------------------------------------------------------------ a GPT imported from CLIP-GEN

@pytest.fixture(scope="module")
def clipgen(tmp_path_factory):
    """The CLIP-GEN GPT fixture with a tiny VQGAN and CLIP that fit it (64 codes, a 4x4 grid, 32-d)."""
    root = write_clipgen_mates(tmp_path_factory.mktemp("clipgen"))
    return {"vqgan": str(root / "vqgan.pt"), "gpt": str(COMPAT_DIR / "clipgen_gpt_small.pt"),
            "clip": str(root / "clip.pt")}


def test_api_refuses_guidance_on_a_clipgen_gpt_and_samples_without(clipgen):
    pipe = TextToImage.from_paths(clipgen["vqgan"], clipgen["gpt"], clipgen["clip"], device="cpu")
    calls = []
    pipe.gpt.register_forward_hook(lambda *_: calls.append(1))
    for call in (lambda: pipe("a red circle", n_candidates=2, cfg_scale=2.0),
                 lambda: pipe.interpolate("a red circle", "a blue square", steps=2, cfg_scale=0.5)):
        with pytest.raises(GuidanceError) as e:
            call()
        assert "\n" not in str(e.value) and "CLIP-GEN trains none" in str(e.value)
    assert calls == []  # refused before any sampling
    assert default_sampling(pipe.gpt.cfg) == "clipgen"
    assert SAMPLING_PRESETS["clipgen"] == {"n_candidates": 64, "top_k": 500, "top_p": 0.95, "temperature": 1.0}
    out = pipe("a red circle", **SAMPLING_PRESETS["clipgen"], keep=3, seed=0)
    assert out.images.shape == (3, 3, 32, 32) and out.tokens.shape == (3, 4, 4)


def test_evaluate_refuses_guidance_on_a_clipgen_gpt(clipgen, tmp_path, capsys):
    import evaluate

    code = 0
    try:
        run(evaluate.main, evaluate.parse_args(["--vqgan", clipgen["vqgan"], "--gpt", clipgen["gpt"], "--clip",
                                                clipgen["clip"], "--prompts", "1", "--samples", "1", "--cfg-scale",
                                                "2", "--device", "cpu", "--json", str(tmp_path / "r.json")]))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "guidance" in err and "cfg" in err and not (tmp_path / "r.json").exists()
