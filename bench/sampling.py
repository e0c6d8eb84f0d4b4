"""Sampling speed: the project's KV-cache sampler (models.gpt.GPT.sample, the call models/pipeline.py makes)
against a naive reference written here: the whole sequence recomputed at every step, no cache, float32,
explicit attention (no SDPA), the same weights and the same sampling (temperature, top-k via
models.gpt.filter_logits, one multinomial draw per step from the same generator).

    python bench/sampling.py                       # shapes, 8x512, gpt2-medium on the best device
    python bench/sampling.py --cases 8x512 --threads 2 --json out.json

Before timing, each case checks that the two samplers agree: greedy decoding (top_k=1), same seed, fp32,
guidance 1 and 2, a short sequence -> identical tokens (asserted), so the speed-up compares like with like.

Rows per case and guidance scale: naive fp32, project fp32, and on devices where
engine.distributed.autocast_dtype('auto', device) picks bf16 (CUDA; CPUs with AMX / AVX512-BF16) also
project bf16 autocast, so the KV-cache gain and the precision gain read separately. (models/pipeline.py
itself autocasts on CUDA only: on CPU the demo runs the fp32 row.) Where the naive sampler would take too
long it is timed on the first `naive_prefix` tokens, one timing per step, and the rest of the steps are
extrapolated with a least-squares line through the measured per-step times (a full recompute grows
about linearly with the length); the row says so (`naive_measured`).
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common as C  # noqa: E402
from engine import distributed as D  # noqa: E402
from models.gpt import GPT, GPTConfig, draw  # noqa: E402

SHAPES_GPT = C.REPO / "pretrained" / "shapes" / "gpt.safetensors"


# ------------------------------------------------------------------------------------ naive reference

def naive_logits(gpt: GPT, tokens: torch.Tensor, cond: torch.Tensor, cond_drop: torch.Tensor | None):
    """Logits (rows, vocab) for the next token after `tokens` (rows, t), recomputing every position."""
    cfg = gpt.cfg
    B, t = tokens.shape
    prefix = gpt.cond_proj(cond).view(B, cfg.n_prefix, cfg.n_embd)
    if cond_drop is not None:
        prefix = torch.where(cond_drop.view(B, 1, 1), gpt.null_prefix, prefix)
    x = torch.cat([prefix, gpt.tok_emb(tokens)], dim=1)
    T = x.shape[1]
    x = x + gpt.pos_emb[:, :T]
    H, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    for blk in gpt.blocks:
        h = blk.ln_1(x)
        q, k, v = (z.view(B, T, H, hd).transpose(1, 2) for z in blk.attn.qkv(h).split(cfg.n_embd, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + blk.attn.proj(y)
        x = x + blk.mlp.proj(F.gelu(blk.mlp.fc(blk.ln_2(x))))
    return gpt.head(gpt.ln_f(x[:, -1]))


@torch.no_grad()
def naive_sample(gpt: GPT, cond, temperature=1.0, top_k=None, cfg_scale=1.0, generator=None, n_tokens=None,
                 step_times: list | None = None):
    """The reference: no cache, fp32, full recompute each step. step_times collects seconds per step."""
    n_tokens = n_tokens or gpt.cfg.n_tokens
    B, device = cond.shape[0], cond.device
    out = torch.empty(B, n_tokens, dtype=torch.long, device=device)
    guided = cfg_scale != 1.0
    cond_drop = None
    if guided:
        cond = torch.cat([cond, cond])
        cond_drop = torch.arange(2 * B, device=device) >= B
    gpt.eval()
    for i in range(n_tokens):
        t0 = time.perf_counter()
        seq = out[:, :i]
        logits = naive_logits(gpt, seq.repeat(2, 1) if guided else seq, cond, cond_drop).float()
        if guided:
            c, u = logits.chunk(2)
            logits = u + cfg_scale * (c - u)
        out[:, i] = draw(logits / temperature, top_k, None, generator)[:, 0]  # the project's draw
        if step_times is not None:
            C.sync(device)
            step_times.append(time.perf_counter() - t0)
    return out


def project_sample(gpt: GPT, cond, amp, **kw):
    """The call models/pipeline.py makes (TextToImage.sample_conds), under the given autocast dtype."""
    device = cond.device
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return gpt.sample(cond, **kw)


def check_greedy_agreement(gpt: GPT, cond: torch.Tensor, n_tokens: int, seed: int = 0) -> dict:
    """Assert the naive and project samplers draw identical tokens under greedy decoding (fp32)."""
    out = {}
    for scale in (1.0, 2.0):
        a = naive_sample(gpt, cond, top_k=1, cfg_scale=scale, n_tokens=n_tokens,
                         generator=torch.Generator(cond.device).manual_seed(seed))
        b = project_sample(gpt, cond, None, top_k=1, cfg_scale=scale, n_tokens=n_tokens,
                           generator=torch.Generator(cond.device).manual_seed(seed))
        same = bool(torch.equal(a, b))
        assert same, f"naive and project samplers disagree under greedy decoding (cfg {scale}): " \
                     f"{(a != b).sum().item()} of {a.numel()} tokens differ"
        out[f"greedy_identical_cfg{scale:g}"] = same
    out["greedy_check_tokens"] = n_tokens
    return out


# ------------------------------------------------------------------------------------------- cases

def sizes(quick: bool, device: torch.device | None = None) -> dict[str, dict]:
    if quick:
        return {
            "shapes": dict(source="shipped", batch=2, n_tokens=8, naive_prefix=None, repeats=1, check_tokens=4),
            "tiny-random": dict(source=GPTConfig(vocab_size=64, n_tokens=16, n_layer=2, n_head=2, n_embd=32,
                                                 cond_dim=16), batch=2, n_tokens=16, naive_prefix=8, repeats=1,
                                check_tokens=4),
        }
    return {
        "shapes": dict(source="shipped", batch=8, n_tokens=64, naive_prefix=None, repeats=3, check_tokens=16),
        # 16x16 tokens of CLIP-GEN's f16-16384 VQGAN, a 512-d CLIP embedding; random weights.
        "8x512": dict(source=GPTConfig(vocab_size=16384, n_tokens=256, n_layer=8, n_head=8, n_embd=512,
                                       cond_dim=512), batch=8, n_tokens=256, naive_prefix=64, repeats=2,
                      check_tokens=16),
        "gpt2-medium": dict(source=GPTConfig(vocab_size=16384, n_tokens=256, n_layer=24, n_head=16, n_embd=1024,
                                             cond_dim=512), batch=8, n_tokens=256, naive_prefix=24, repeats=1,
                            check_tokens=8),
        # The H100 target: 64 candidates (CLIP-GEN's demo draws 64) of gpt2-medium size in <= 1 s.
        **({"gpt2-medium-64": dict(source=GPTConfig(vocab_size=16384, n_tokens=256, n_layer=24, n_head=16,
                                                    n_embd=1024, cond_dim=512), batch=64, n_tokens=256,
                                   naive_prefix=8, repeats=3, check_tokens=8)}
           if device is not None and device.type == "cuda" else {}),
    }


def build(spec) -> GPT:
    if spec["source"] == "shipped":
        from models.convert_gpt import load_gpt
        return load_gpt(SHAPES_GPT)
    torch.manual_seed(0)
    return GPT(spec["source"]).eval()


def extrapolate(step_times: list[float], n_total: int) -> tuple[float, dict]:
    """Total seconds for n_total steps from per-step times of the first steps: a least-squares line
    t(i) = a + b i through the steps after the first (which may include one-off costs)."""
    ys = step_times[1:] if len(step_times) > 3 else step_times
    xs = list(range(len(step_times) - len(ys), len(step_times)))
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    a = my - b * mx
    measured = sum(step_times)
    rest = sum(max(a + b * i, 0.0) for i in range(len(step_times), n_total))
    return measured + rest, {"fit_a_s": a, "fit_b_s_per_token": b}


def run_case(name: str, quick: bool, device: torch.device) -> list[dict]:
    spec = sizes(quick, device)[name]
    gpt = build(spec).to(device).eval().requires_grad_(False)
    cfg = gpt.cfg
    B, n_tok, reps = spec["batch"], spec["n_tokens"], spec["repeats"]
    g = torch.Generator(device).manual_seed(0)
    cond = F.normalize(torch.randn(B, cfg.cond_dim, generator=g, device=device), dim=-1)
    common = {"model": name, "layers": cfg.n_layer, "width": cfg.n_embd, "vocab": cfg.vocab_size,
              "params_m": sum(p.numel() for p in gpt.parameters()) / 1e6, "batch": B, "tokens": n_tok}
    check = check_greedy_agreement(gpt, cond, spec["check_tokens"])
    bf16 = D.autocast_dtype("auto", device)
    gpt_bf16 = copy.deepcopy(gpt).to(torch.bfloat16) if bf16 is not None else None
    sample_kw = dict(temperature=1.0, top_k=100 if cfg.vocab_size > 100 else None, n_tokens=n_tok)
    bandwidth = C.measure_bandwidth(device)
    rows = []
    for scale in (1.0, 2.0):
        def seeded():
            return torch.Generator(device).manual_seed(1)
        nk = {k: v for k, v in sample_kw.items() if k != "n_tokens"}
        prefix = spec["naive_prefix"] if spec["naive_prefix"] and spec["naive_prefix"] < n_tok else None

        def naive_once() -> tuple[float, dict]:
            """Seconds of the naive sampler for all n_tok tokens (timed, or timed on a prefix + fitted)."""
            if prefix:
                step_times: list[float] = []
                naive_sample(gpt, cond, cfg_scale=scale, generator=seeded(), n_tokens=prefix,
                             step_times=step_times, **nk)
                return extrapolate(step_times, n_tok)
            C.sync(device)
            t = time.perf_counter()
            naive_sample(gpt, cond, cfg_scale=scale, generator=seeded(), **sample_kw)
            C.sync(device)
            return time.perf_counter() - t, {}

        variants = [("fp32", None, gpt, cond)]
        if bf16 is not None:
            variants.append(("bf16 autocast", bf16, gpt, cond))
            # Weights stored in bf16 (no per-step casts): half the bytes each decode step reads.
            variants.append(("bf16 weights", None, gpt_bf16, cond.to(torch.bfloat16)))
        runs = [lambda model=model, c_in=c_in, amp=amp: project_sample(model, c_in, amp, cfg_scale=scale,
                                                                       generator=seeded(), **sample_kw)
                for _, amp, model, c_in in variants]
        naive_sample(gpt, cond, cfg_scale=scale, generator=seeded(), n_tokens=2, **nk)   # warm-ups
        for run in runs:
            run()
        # Rounds of naive, then each project variant: the VM's speed drift hits them alike.
        naive_times, fits, times = [], [], [[] for _ in runs]
        for _ in range(reps):
            t, fit = naive_once()
            naive_times.append(t)
            fits.append(fit)
            for i, run in enumerate(runs):
                C.sync(device)
                t0 = time.perf_counter()
                run()
                C.sync(device)
                times[i].append(time.perf_counter() - t0)
        naive_s = statistics.median(naive_times)
        naive_note = (f"first {prefix} of {n_tok} steps timed, rest extrapolated (linear fit), median of {reps}"
                      if prefix else f"all {n_tok} steps, median of {reps}")
        rows.append({**common, "cfg_scale": scale, "sampler": "naive (no cache)", "precision": "fp32",
                     "seconds": naive_s, "times_s": naive_times, "tokens_per_s": B * n_tok / naive_s,
                     "images_per_s": B / naive_s, "speedup_vs_naive": 1.0, "measured": naive_note,
                     **fits[naive_times.index(sorted(naive_times)[(reps - 1) // 2])], **check})
        for (prec, amp, _, _), ts in zip(variants, times):
            s = statistics.median(ts)
            # Memory-bandwidth floor of a decode step: weights (fp32 unless stored in bf16) and the KV cache
            # (in the dtype attention runs in) read once per step, over the measured copy bandwidth.
            wb, kvb = (2, 2) if prec == "bf16 weights" else (4, 2) if amp is not None else (4, 4)
            floor = C.decode_bytes_per_step(cfg, B * (2 if scale != 1.0 else 1), n_tok, wb, kvb) / (bandwidth * 1e9)
            step_ms = s / n_tok * 1e3
            rows.append({**common, "cfg_scale": scale, "sampler": "project (KV cache)", "precision": prec,
                         "seconds": s, "min_s": min(ts), "max_s": max(ts), "times_s": ts,
                         "tokens_per_s": B * n_tok / s, "images_per_s": B / s,
                         "speedup_vs_naive": C.round_ratio(naive_times, ts),
                         "measured": f"all {n_tok} steps, median of {reps} after 1 warm-up",
                         "step_ms": step_ms, "floor_ms": floor * 1e3, "floor_share": floor * 1e3 / step_ms,
                         "bandwidth_gbs": bandwidth, **check})
    return rows


COLUMNS = [("case", "model"), ("params_m", "params (M)"), ("batch", "batch"), ("tokens", "tokens"),
           ("cfg_scale", "cfg"), ("sampler", "sampler"), ("precision", "precision"), ("seconds", "s / batch"),
           ("tokens_per_s", "tokens/s"), ("images_per_s", "images/s"), ("speedup_vs_naive", "× naive"),
           ("greedy_identical_cfg1", "greedy = (cfg 1)"), ("greedy_identical_cfg2", "greedy = (cfg 2)"),
           ("step_ms", "ms / step"), ("floor_ms", "bandwidth floor (ms)"), ("floor_share", "floor / step"),
           ("measured", "what was timed"), ("peak_rss_mb", "peak RSS (MiB)")]

NOTES = [
    "naive: full recompute of the sequence every step, no KV cache, fp32, explicit attention; same weights, "
    "same temperature/top-k (top_k=100) and draw (models.gpt.draw) as the project sampler.",
    "project: models.gpt.GPT.sample (KV cache), called as models/pipeline.py calls it; bf16 autocast row where "
    "engine.distributed.autocast_dtype('auto') picks bf16 (the pipeline itself autocasts on CUDA only); "
    "bf16 weights: a copy of the GPT stored in bf16 (no per-step casts), same sampler.",
    "greedy =: naive and project (fp32) samplers produce identical tokens with top_k=1, same seed (asserted).",
    "8x512 and gpt2-medium: random weights, 16384-code vocabulary, 512-d condition (CLIP-GEN's f16-16384 sizes).",
    "peak RSS: per case (fresh subprocess), covering all samplers of that case.",
    "bandwidth floor: bytes a decode step must read (every weight it multiplies, fp32 or bf16 as stored, and "
    "the KV cache at the average position) over the device's copy bandwidth (bench.common.measure_bandwidth); "
    "floor / step near 1 means the step is bound by memory traffic.",
]


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = torch.device(args.device or C.best_device())
    cases = {name: (lambda name=name: run_case(name, args.quick, device)) for name in sizes(args.quick, device)}
    return C.run_cases("sampling", args, cases, COLUMNS, __file__, NOTES)


if __name__ == "__main__":
    main()
