"""Sampling speed: the project's KV-cache sampler (models.gpt.GPT.sample, the call models/pipeline.py makes)
against a naive reference written here: the whole sequence recomputed at every step, no cache, float32,
explicit attention (no SDPA), the same weights and the same sampling (temperature, top-k via
models.gpt.filter_logits, one multinomial draw per step from the same generator).

    python bench/sampling.py                       # shapes, 8x512, gpt2-medium on the best device
    python bench/sampling.py --cases 8x512 --threads 2 --json out.json

Before timing, each case checks that the two samplers agree: greedy decoding (top_k=1), same seed, fp32,
guidance 1 and 2, a short sequence -> identical tokens (asserted), so the speed-up compares like with like.

Rows per case and guidance scale: naive fp32, project fp32, and on devices where
engine.distributed.autocast_dtype('auto', device) picks bf16 (CUDA; CPUs with AMX) also
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
from models import packed  # noqa: E402
from models.gpt import GPT, GPTConfig, draw  # noqa: E402

SHAPES_GPT = C.REPO / "pretrained" / "shapes" / "gpt.safetensors"


# ------------------------------------------------------------------------------------ naive reference

def naive_logits(gpt: GPT, tokens: torch.Tensor, cond: torch.Tensor, cond_drop: torch.Tensor | None):
    """Logits (rows, vocab) for the next token after `tokens` (rows, t), recomputing every position."""
    cfg = gpt.cfg
    B, t = tokens.shape
    x = torch.cat([gpt.prefix(cond, cond_drop), gpt.tok_emb(tokens)], dim=1)
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


# ------------------------------------------------------------------------------------ the fast paths

BEFORE_FP32, BEFORE_BF16 = "one token, F.linear (before)", "one token, F.linear, bf16 weights (before)"


def unpacked(gpt: GPT, dtype: torch.dtype | None = None) -> GPT:
    """A copy that decodes through F.linear (MKL on a CPU): the sampler before prepacked weights."""
    m = copy.deepcopy(gpt)
    if dtype is not None:
        m = m.to(dtype)
    m.pack_decoding = False
    return m


def decoders(gpt: GPT, cond: torch.Tensor, device: torch.device, bf16, n_tokens: int) -> list[dict]:
    """The decoders a case compares: the sampler as it was (fp32 and bf16 weights through F.linear) and
    the fast paths (prepacked weights on a CPU, static or CUDA-graph steps, speculative Jacobi decoding)."""
    def v(name, model, precision="fp32", amp=None, before=False, **kw):
        c = cond.to(next(model.parameters()).dtype)
        return dict(name=name, model=model, cond=c, precision=precision, amp=amp, before=before, kw=kw)

    out = [v(BEFORE_FP32, unpacked(gpt), before=True),
           v(BEFORE_BF16, unpacked(gpt, torch.bfloat16), "bf16 weights", before=True)]
    if device.type == "cpu":
        out.append(v("one token, packed (default)", gpt))
        if packed.supported(torch.bfloat16):
            out.append(v("one token, packed, bf16 weights", copy.deepcopy(gpt).to(torch.bfloat16), "bf16 weights"))
        out.append(v("one token, packed, static step", gpt, step="static"))
    else:
        out.append(v("one token, cuda-graph step", gpt, step="cuda-graph"))
        if bf16 is not None:
            out.append(v("one token, bf16 autocast", gpt, "bf16 autocast", amp=bf16))
            out.append(v("one token, bf16 autocast, cuda-graph step", gpt, "bf16 autocast", amp=bf16,
                         step="cuda-graph"))
        out.append(v("one token, bf16 weights, cuda-graph step", out[1]["model"], "bf16 weights",
                     step="cuda-graph"))
    for window in (4, 8):
        out.append(v(f"sjd window {window}", gpt, parallel="sjd", window=window))
    for window in zipar_windows(n_tokens):
        out.append(v(f"zipar window {window}", gpt, parallel="zipar", window=window))
    return out


def zipar_windows(n_tokens: int) -> list[int]:
    """Row-parallel windows a case times: a quarter of a row, half a row less one (the widest under half
    the forwards of one-token decoding) and half a row (the default)."""
    side = math.isqrt(n_tokens)
    return sorted({max(1, side // 4), max(1, side // 2 - 1), max(1, side // 2)})


def check_fast_paths(gpt: GPT, cond: torch.Tensor, n_tokens: int, variants: list[dict]) -> dict:
    """Assert every fp32 fast path draws the plain sampler's tokens under greedy decoding (top_k=1) and, for
    the one-token paths, with the same seed: the speed-ups compare like with like."""
    # On a CPU the paths agree token for token (asserted). On a GPU the static step's masked attention runs
    # another SDPA kernel than the eager step (another summation order) and random weights give near-uniform
    # logits whose argmax such rounding can flip, after which a row's later tokens differ too: there 90% of
    # the greedy tokens must agree (a wrong position or a stale cache agrees on next to none), the seeded
    # draws are only recorded, and the smallest share is kept in the rows.
    cpu = cond.device.type == "cpu"
    need = 1.0 if cpu else 0.9
    shares = [1.0]
    ref = {scale: project_sample(variants[0]["model"], cond, None, top_k=1, cfg_scale=scale, n_tokens=n_tokens)
           for scale in (1.0, 2.0)}
    for v in variants[2:]:
        if v["precision"] != "fp32" or v["kw"].get("parallel") == "zipar":   # zipar: another distribution
            continue
        for scale in (1.0, 2.0):
            got = project_sample(v["model"], cond, None, top_k=1, cfg_scale=scale, n_tokens=n_tokens, **v["kw"])
            shares.append(float((got == ref[scale]).double().mean()))
            assert shares[-1] >= need, f"{v['name']} disagrees with plain greedy decoding (cfg {scale}): " \
                                       f"{shares[-1]:.1%} of the tokens agree"
        if "parallel" not in v["kw"]:
            a, b = (project_sample(m, cond, None, top_k=50, cfg_scale=2.0, n_tokens=n_tokens,
                                   generator=torch.Generator(cond.device).manual_seed(3), **kw)
                    for m, kw in ((variants[0]["model"], {}), (v["model"], v["kw"])))
            shares.append(float((a == b).double().mean()))
            assert shares[-1] == 1.0 or not cpu, f"{v['name']} draws other tokens than the plain sampler for " \
                                                 f"a seed: {shares[-1]:.1%} agree"
    return {"fast_paths_greedy_identical": min(shares) == 1.0, "fast_paths_min_token_agreement": min(shares)}


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
                                       cond_dim=512), batch=8, n_tokens=256, naive_prefix=64, repeats=3,
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
    sample_kw = dict(temperature=1.0, top_k=100 if cfg.vocab_size > 100 else None, n_tokens=n_tok)
    variants = decoders(gpt, cond, device, bf16, n_tok)
    check.update(check_fast_paths(gpt, cond, spec["check_tokens"], variants))
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

        forwards = [[] for _ in variants]

        def run(i):
            v = variants[i]
            project_sample(v["model"], v["cond"], v["amp"], cfg_scale=scale, generator=seeded(), **sample_kw,
                           **v["kw"])
            forwards[i].append(v["model"].last_forwards if "parallel" in v["kw"] else n_tok)

        naive_sample(gpt, cond, cfg_scale=scale, generator=seeded(), n_tokens=2, **nk)   # warm-ups
        for i in range(len(variants)):
            run(i)
        # Rounds of naive, then each project variant: the VM's speed drift hits them alike.
        naive_times, fits, times = [], [], [[] for _ in variants]
        for _ in range(reps):
            t, fit = naive_once()
            naive_times.append(t)
            fits.append(fit)
            for i in range(len(variants)):
                C.sync(device)
                t0 = time.perf_counter()
                run(i)
                C.sync(device)
                times[i].append(time.perf_counter() - t0)
        naive_s = statistics.median(naive_times)
        naive_note = (f"first {prefix} of {n_tok} steps timed, rest extrapolated (linear fit), median of {reps}"
                      if prefix else f"all {n_tok} steps, median of {reps}")
        rows.append({**common, "cfg_scale": scale, "sampler": "naive (no cache)", "precision": "fp32",
                     "seconds": naive_s, "times_s": naive_times, "tokens_per_s": B * n_tok / naive_s,
                     "images_per_s": B / naive_s, "speedup_vs_naive": 1.0, "measured": naive_note,
                     "forwards": n_tok, **fits[naive_times.index(sorted(naive_times)[(reps - 1) // 2])], **check})
        before = {v["name"]: ts for v, ts in zip(variants, times) if v["before"]}
        for v, ts, fw in zip(variants, times, forwards):
            s = statistics.median(ts)
            n_fw = statistics.median(fw[1:] or fw)                  # the timed runs (the first is the warm-up)
            row = {**common, "cfg_scale": scale, "sampler": v["name"], "precision": v["precision"],
                   "seconds": s, "min_s": min(ts), "max_s": max(ts), "times_s": ts, "forwards": n_fw,
                   "tokens_per_s": B * n_tok / s, "images_per_s": B / s,
                   "speedup_vs_naive": C.round_ratio(naive_times, ts),
                   "min_speedup_vs_naive": min(n / t for n, t in zip(naive_times, ts)),
                   "measured": f"all {n_tok} steps, median of {reps} after 1 warm-up", "bandwidth_gbs": bandwidth,
                   **{f"x_{k}": C.round_ratio(b, ts) for k, b in before.items()}, **check}
            if v["kw"].get("parallel") == "zipar":     # not in the greedy check: it draws another distribution
                row["fast_paths_greedy_identical"] = None
            if "parallel" not in v["kw"]:
                # Memory-bandwidth floor of a decode step: weights (fp32 unless stored in bf16) and the KV
                # cache (in the dtype attention runs in) read once per step, over the measured copy bandwidth.
                wb, kvb = (2, 2) if v["precision"] == "bf16 weights" else (4, 2) if v["amp"] is not None else (4, 4)
                floor = C.decode_bytes_per_step(cfg, B * (2 if scale != 1.0 else 1), n_tok, wb, kvb) / (bandwidth * 1e9)
                step_ms = s / n_tok * 1e3
                row.update(step_ms=step_ms, floor_ms=floor * 1e3, floor_share=floor * 1e3 / step_ms)
            rows.append(row)
    return rows


COLUMNS = [("case", "model"), ("params_m", "params (M)"), ("batch", "batch"), ("tokens", "tokens"),
           ("cfg_scale", "cfg"), ("sampler", "sampler"), ("precision", "precision"), ("seconds", "s / batch"),
           ("forwards", "forwards / batch"), ("tokens_per_s", "tokens/s"), ("images_per_s", "images/s"),
           ("speedup_vs_naive", "× naive"), ("min_speedup_vs_naive", "× naive (worst run)"),
           (f"x_{BEFORE_FP32}", "× before fp32"), (f"x_{BEFORE_BF16}", "× before bf16 weights"),
           ("greedy_identical_cfg1", "greedy = (cfg 1)"), ("greedy_identical_cfg2", "greedy = (cfg 2)"),
           ("fast_paths_greedy_identical", "fast paths = plain"),
           ("step_ms", "ms / step"), ("floor_ms", "bandwidth floor (ms)"), ("floor_share", "floor / step"),
           ("measured", "what was timed"), ("peak_rss_mb", "peak RSS (MiB)")]

NOTES = [
    "naive: full recompute of the sequence every step, no KV cache, fp32, explicit attention; same weights, "
    "same temperature/top-k (top_k=100) and draw (models.gpt.draw) as the project sampler.",
    "project rows: models.gpt.GPT.sample (KV cache), called as models/pipeline.py calls it. '(before)': the "
    "sampler before issue 18, every Linear through F.linear (MKL on a CPU), fp32 and with the weights stored in "
    "bf16; 'packed': the default now, weights prepacked for oneDNN (models/packed.py; bf16 only where oneDNN "
    "packs bf16 on this CPU); 'static step': fixed-shape KV cache (GPT.step_static); on CUDA the 'cuda-graph' "
    "rows replay the static step as a CUDA graph and bf16 autocast is what the pipeline uses; 'sjd window k': "
    "speculative Jacobi decoding with k drafts per forward, packed weights; 'zipar window k': row-parallel "
    "decoding (a row starts once the row above has k tokens; an approximation of the distribution, so not in "
    "the greedy check: its fidelity is measured with evaluate.py), packed weights.",
    "forwards / batch: sequential forward passes per batch of grids (the one-token decoders: one per token; "
    "SJD: median over the timed runs). They do not drift with the machine. On random weights SJD accepts "
    "few drafts: the distributions barely depend on the context, but the top-k set does, so drafts keep "
    "missing it (trained models accept more: bench/sjd.py on the shipped GPTs).",
    "× before fp32 / × before bf16 weights: wall-time ratio to that '(before)' row, the median of the "
    "within-round ratios; × naive (worst run): the smallest ratio of any round.",
    "fast paths = plain (CPU; on a GPU the smallest share of agreeing tokens is fast_paths_min_token_agreement, "
    "greedy >= 90% asserted): every fp32 fast path draws the plain sampler's tokens under greedy decoding (cfg 1 "
    "and 2), and the one-token paths also with top-k 50 and a seed (asserted before timing).",
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
