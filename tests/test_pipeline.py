"""The sampling pipeline (text -> CLIP -> GPT -> VQGAN -> CLIP re-ranking) and evaluate.py on tiny models."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from models.gpt import build_gpt
from models.pipeline import TextToImage
from tests.conftest import REPO
from tests.tiny import TINY_CLIP, write_tiny
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
    assert set(res["raw"]) == {"color", "shape", "size", "position", "all"}
    assert all(0.0 <= v <= 1.0 for v in res["raw"].values())
    assert res["reranked"]["all"] >= 0.0 and res["prompts"] == 3
    assert res["clip_score"]["reranked"] >= res["clip_score"]["raw"]  # the kept sample is the best-scoring one
    assert res["clip_fd"] >= 0 and res["clip_fd_real_images"] == 12
    assert res["diversity"] == {}  # every attribute named


def test_evaluate_color_shape_prompts_report_unnamed_diversity(paths, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--vqgan", paths["vqgan"], "--gpt", paths["gpt"],
                        "--clip", paths["clip"], "--prompts", "2", "--samples", "3", "--named", "color+shape",
                        "--cond-source", "image", "--fd-real", "0", "--device", "cpu", "--json", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["diversity"]) == {"size", "position"} and res["diversity"]["position"]["of"] == 9
    assert 0 <= res["diversity"]["position"]["distinct_min"] <= 3 and "clip_fd" not in res
    assert "unnamed position" in r.stdout and res["cond_source"] == "image"


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_evaluate_fid_without_torch_fidelity_is_one_line_error(paths):
    r = subprocess.run([sys.executable, "evaluate.py", "--vqgan", paths["vqgan"], "--gpt", paths["gpt"],
                        "--clip", paths["clip"], "--prompts", "1", "--samples", "1", "--fid"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "torch-fidelity" in r.stderr and len(r.stderr.strip().splitlines()) == 1


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


def test_bf16_on_cpu_stores_the_gpt_in_bf16_and_auto_keeps_fp32(paths):
    """--precision bf16 on a CPU: the GPT's weights in bf16 (decode steps read half the bytes); the default
    stays fp32. Both sample valid, reproducible images."""
    fp32 = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu")
    bf16 = TextToImage.from_paths(paths["vqgan"], paths["gpt"], paths["clip"], device="cpu", precision="bf16")
    assert next(fp32.gpt.parameters()).dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.gpt.parameters())
    a = bf16("a red circle", n_candidates=4, keep=2, seed=3, batch_size=4)
    b = bf16("a red circle", n_candidates=4, keep=2, seed=3, batch_size=4)
    assert torch.equal(a.tokens, b.tokens) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.tokens.max() < fp32.vqgan.cfg.n_codes
