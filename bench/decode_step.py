"""Where a CPU decode step's time goes: each weight matrix of the 8 x 512 GPT (16384 codes) multiplied by the
rows of one step through F.linear (MKL) and through the prepacked oneDNN path (models/packed.py), as time and
as the bandwidth at which the weight is read, then a torch.profiler table of whole decode steps (packed, the
default) at one position, and the step time packed and unpacked.

    python bench/decode_step.py --threads 2 [--rows 8] [--position 128] [--json out.json]

Timings are medians of --repeats calls after warm-ups; the variants of a layer are timed in turns.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common as C  # noqa: E402
from models import packed  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=16384, n_tokens=256, n_layer=8, n_head=8, n_embd=512, cond_dim=512)


def median_ms(fns, repeats: int) -> list[float]:
    """Median milliseconds of each function, called in turns."""
    for fn in fns:
        for _ in range(5):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) * 1e3 for ts in times]


def layers(rows: int, repeats: int) -> list[dict]:
    out = []
    C_ = CFG.n_embd
    for name, (n_in, n_out) in {"qkv": (C_, 3 * C_), "attn proj": (C_, C_), "mlp fc": (C_, 4 * C_),
                                "mlp proj": (4 * C_, C_), "head": (C_, CFG.vocab_size)}.items():
        w, b, x = torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(rows, n_in)
        p = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        plain, fast = median_ms([lambda: F.linear(x, w, b),
                                 lambda: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")], repeats)
        mb = w.numel() * 4 / 1e6
        out.append({"layer": name, "shape": f"{n_in} -> {n_out}", "f_linear_ms": plain, "packed_ms": fast,
                    "f_linear_gbs": mb / plain, "packed_gbs": mb / fast, "x": plain / fast})
    return out


def decode_steps(rows: int, position: int, repeats: int) -> tuple[dict, str]:
    torch.manual_seed(0)
    gpt = GPT(CFG).eval()
    cond = torch.randn(rows, CFG.cond_dim)
    tokens = torch.randint(0, CFG.vocab_size, (rows, position))

    def stepper(pack: bool):
        packed.unpack_linears(gpt)
        if pack:
            packed.pack_linears(gpt, rows)
        cache = gpt.new_kv_cache(rows, CFG.n_prefix + CFG.n_tokens)
        gpt(tokens, cond, kv_cache=cache)
        feed = tokens[:, -1:]

        def step():
            gpt(feed, None, kv_cache=cache)
            cache.length -= 1            # the same position every time
        return step

    with torch.no_grad():
        unpacked_ms = median_ms([stepper(False)], repeats)[0]
        step = stepper(True)
        packed_ms = median_ms([step], repeats)[0]
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {"unpacked_step_ms": unpacked_ms, "packed_step_ms": packed_ms, "x": unpacked_ms / packed_ms}, table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=8, help="rows per step (batch x guidance)")
    p.add_argument("--position", type=int, default=128, help="tokens already cached")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not packed.supported(torch.float32):
        raise SystemExit("bench/decode_step.py: this torch has no oneDNN: nothing to compare")
    info = C.machine_info(torch.device("cpu"))
    print(f"{info['cpu']}, {info['cores']} cores, {torch.get_num_threads()} threads, torch {info['torch']}, "
          f"copy bandwidth {C.measure_bandwidth(torch.device('cpu')):.1f} GB/s (read + write)")
    rows = layers(args.rows, args.repeats)
    print(f"\n| layer | weight | F.linear ms | GB/s | packed ms | GB/s | x |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['shape']} | {r['f_linear_ms']:.3f} | {r['f_linear_gbs']:.1f} | "
              f"{r['packed_ms']:.3f} | {r['packed_gbs']:.1f} | {r['x']:.2f} |")
    steps, table = decode_steps(args.rows, args.position, max(10, args.repeats // 2))
    print(f"\ndecode step at position {args.position}, {args.rows} rows: F.linear {steps['unpacked_step_ms']:.1f} ms, "
          f"packed {steps['packed_step_ms']:.1f} ms ({steps['x']:.2f}x)\n\nprofile of 20 packed steps:\n{table}")
    result = {"machine": info, "threads": torch.get_num_threads(), "rows": args.rows, "position": args.position,
              "layers": rows, "steps": steps, "profile": table}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
