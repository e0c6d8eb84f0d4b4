"""Smoke tests of bench/ with --quick sizes: every benchmark runs, writes valid JSON with the expected keys,
and the naive reference sampler draws exactly the project sampler's tokens under greedy decoding."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench import sampling as S
from models.gpt import GPT, GPTConfig
from tests.conftest import REPO

EXPECTED_ROW_KEYS = {
    "sampling": {"case", "sampler", "precision", "cfg_scale", "tokens_per_s", "images_per_s", "speedup_vs_naive",
                 "greedy_identical_cfg1", "greedy_identical_cfg2", "measured", "peak_rss_mb"},
    "train_gpt": {"case", "data", "precision", "step_s", "tokens_per_s", "speedup_vs_on_the_fly", "peak_rss_mb"},
    "demo": {"case", "cand_size", "wall_median_s", "wall_min_s", "wall_max_s", "imports_s", "loading_s",
             "sampling_s"},
    "train_vqgan": {"case", "precision", "lpips", "step_s", "images_per_s", "peak_rss_mb"},
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--threads", "1", "--device", "cpu",
                           "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    return json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


@pytest.mark.slow  # ~40 s: every benchmark end to end at its quick sizes, in subprocesses
def test_run_all_quick_writes_json_and_markdown(quick_results):
    doc, md = quick_results
    assert doc["failed"] == []
    assert {"cpu", "cores", "torch"} <= set(doc["machine"])
    for name, keys in EXPECTED_ROW_KEYS.items():
        res = doc["benchmarks"][name]
        assert {"benchmark", "device", "threads", "machine", "rows", "quick"} <= set(res), name
        assert res["rows"], name
        for row in res["rows"]:
            assert "error" not in row, (name, row)
            assert keys <= set(row), (name, keys - set(row))
        assert f"### {name}" in md


@pytest.mark.slow
def test_sampling_rows_compare_like_with_like(quick_results):
    rows = quick_results[0]["benchmarks"]["sampling"]["rows"]
    assert all(r["greedy_identical_cfg1"] and r["greedy_identical_cfg2"] for r in rows)
    for case in {r["model"] for r in rows}:
        n = next(r["tokens"] for r in rows if r["model"] == case)
        assert {r["sampler"] for r in rows if r["model"] == case} == {
            "naive (no cache)", S.BEFORE_FP32, S.BEFORE_BF16, "one token, packed (default)",
            "one token, packed, static step", "sjd window 4", "sjd window 8"} | (
            {"one token, packed, bf16 weights"} if S.packed.supported(torch.bfloat16) else set()) | {
            f"zipar window {w}" for w in S.zipar_windows(n)}, case
    assert all(r["fast_paths_greedy_identical"] is (None if r["sampler"].startswith("zipar") else True) for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    for r in rows:
        n, side = r["tokens"], math.isqrt(r["tokens"])
        if r["sampler"].startswith("zipar"):       # the wavefront's forwards: (rows - 1) * window + width
            w = int(r["sampler"].split()[-1])
            assert r["forwards"] == (n // side - 1) * w + side < n, r
        else:
            assert r["forwards"] == n if not r["sampler"].startswith("sjd") else 1 <= r["forwards"] <= n, r


@pytest.mark.slow  # ~60 s: the GPU script's three stages at the quick sizes, on the CPU
def test_gpu_script_runs_every_stage_and_refuses_without_a_gpu(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "BENCH_DEVICE": "cpu", "BENCH_QUICK": "1"}
    r = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("sampling", "train_gpt", "train_vqgan"):
        assert json.loads((tmp_path / f"{stage}.json").read_text())["rows"], stage
        assert f"{stage}: exit 0" in r.stdout
    if not torch.cuda.is_available():
        env.pop("BENCH_DEVICE")
        r = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path / "gpu")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); run it where a GPU is lent"]


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_naive_and_project_samplers_agree_greedy(cfg_scale):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, n_tokens=12, n_layer=2, n_head=2, n_embd=32, cond_dim=8, n_prefix=2)).eval()
    with torch.no_grad():  # a non-zero null prefix, so guidance changes the logits
        gpt.null_prefix.normal_()
    cond = F.normalize(torch.randn(3, 8), dim=-1)
    kw = dict(top_k=1, cfg_scale=cfg_scale, n_tokens=12)
    a = S.naive_sample(gpt, cond, generator=torch.Generator().manual_seed(0), **kw)
    b = S.project_sample(gpt, cond, None, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)
    S.check_greedy_agreement(gpt, cond, 12)  # the benchmark's own assertion


def test_naive_and_project_samplers_agree_with_same_seed_sampling():
    # Not only greedy: with the same seed and temperature/top-k the draws coincide too on a small model.
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(vocab_size=40, n_tokens=10, n_layer=2, n_head=2, n_embd=32, cond_dim=8)).eval()
    cond = F.normalize(torch.randn(2, 8), dim=-1)
    kw = dict(top_k=10, temperature=0.9, n_tokens=10)
    a = S.naive_sample(gpt, cond, generator=torch.Generator().manual_seed(5), **kw)
    b = S.project_sample(gpt, cond, None, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)


def test_extrapolation_of_a_linear_cost():
    times = [0.5] + [1.0 + 0.1 * i for i in range(1, 8)]  # first step has a one-off cost
    total, fit = S.extrapolate(times, 16)
    assert fit["fit_b_s_per_token"] == pytest.approx(0.1)
    assert total == pytest.approx(sum(times) + sum(1.0 + 0.1 * i for i in range(8, 16)))


def test_flop_and_byte_counts_match_a_real_gpt():
    from bench import common as C

    cfg = GPTConfig(vocab_size=300, n_tokens=16, n_layer=3, n_head=4, n_embd=64, cond_dim=8, n_prefix=2)
    gpt = GPT(cfg)
    blocks_w = sum(m.weight.numel() for m in gpt.blocks.modules() if isinstance(m, torch.nn.Linear))
    head_w = gpt.head.weight.numel()
    T = cfg.n_prefix + cfg.n_tokens - 1
    assert C.gpt_train_flops_per_token(cfg) == 6 * (blocks_w + head_w) + 12 * cfg.n_layer * cfg.n_embd * T
    # Weights a decode step reads: everything but the embedding tables, the condition projection and the
    # null prefix (used at the first step only); KV cache: 2 x layers x rows x mean length x width.
    skip = ("tok_emb.", "pos_emb", "cond_proj.", "null_prefix")
    read = sum(p.numel() for n, p in gpt.named_parameters() if not n.startswith(skip))
    rows, steps = 5, 16
    kv = 2 * cfg.n_layer * rows * (cfg.n_prefix + (steps - 1) / 2) * cfg.n_embd
    assert C.decode_bytes_per_step(cfg, rows, steps, 2, 4) == pytest.approx(2 * read + 4 * kv)


def test_interleaved_timing_takes_turns_and_ratios_are_per_round():
    from bench import common as C

    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    timings, first = C.time_variants(fns, torch.device("cpu"), repeats=3, warmup=1, first_alone=True)
    assert calls == ["a", "b"] * 5 and len(first) == 2          # first alone, warm-up, 3 rounds
    assert [len(t["times_s"]) for t in timings] == [3, 3]
    assert C.round_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0  # median of 2, 4, 3
    assert C.peak_bf16_tflops(torch.device("cpu")) is None


@pytest.mark.slow  # ~15 s: the 8x512 GPT's layers and steps, few repeats
def test_decode_step_bench_compares_each_layer_and_profiles_the_step(tmp_path):
    from bench import decode_step

    if not decode_step.packed.supported(torch.float32):
        pytest.skip("no oneDNN in this torch")
    res = decode_step.main(["--repeats", "3", "--threads", "1", "--json", str(tmp_path / "d.json")])
    assert [r["layer"] for r in res["layers"]] == ["qkv", "attn proj", "mlp fc", "mlp proj", "head"]
    assert all(r["f_linear_ms"] > 0 and r["packed_ms"] > 0 for r in res["layers"])
    assert res["steps"]["packed_step_ms"] > 0 and "_linear_pointwise" in res["profile"]
    assert json.loads((tmp_path / "d.json").read_text())["rows"] == 8
