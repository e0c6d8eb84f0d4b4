"""Speculative Jacobi decoding (or, with --parallel zipar, row-parallel decoding) against one-token decoding
on a GPT, interleaved, medians: forward passes per grid (they do not drift with the machine) and wall time,
for each window.

    python bench/sjd.py --gpt pretrained/shapes/gpt.safetensors --batch 16 --windows 4 8 16 --threads 1
    python bench/sjd.py --parallel zipar --batch 64 --windows 2 4 6 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common as C  # noqa: E402
from models.convert_gpt import load_gpt  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", default=str(C.REPO / "pretrained" / "shapes" / "gpt.safetensors"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--parallel", choices=["sjd", "zipar"], default="sjd")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gpt = load_gpt(args.gpt).eval()
    cond = F.normalize(torch.randn(args.batch, gpt.cfg.cond_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    forwards = {w: [] for w in args.windows}

    def plain():
        gpt.sample(cond, top_k=args.top_k, cfg_scale=args.cfg_scale, generator=torch.Generator().manual_seed(0))

    def sjd(w):
        def call():
            gpt.sample(cond, top_k=args.top_k, cfg_scale=args.cfg_scale, parallel=args.parallel, window=w,
                       generator=torch.Generator().manual_seed(len(forwards[w])))
            forwards[w].append(gpt.last_forwards)
        return call

    with torch.no_grad():
        times = C.timeit_interleaved([plain] + [sjd(w) for w in args.windows], torch.device("cpu"), repeats=args.runs)
    rows = {"plain": {"forwards": gpt.cfg.n_tokens, "ms": times[0]["median_s"] * 1000, "x": 1.0}}
    for w, t in zip(args.windows, times[1:]):
        rows[f"{args.parallel} {w}"] = {"forwards": statistics.median(forwards[w]), "ms": t["median_s"] * 1000,
                            "x": C.round_ratio(times[0]["times_s"], t["times_s"])}
    print(f"{Path(args.gpt).name}: {args.batch} grids of {gpt.cfg.n_tokens} tokens, top-k {args.top_k}, guidance "
          f"{args.cfg_scale:g}, {args.threads} thread(s), {C.cpu_model()}, medians of {args.runs} interleaved rounds")
    print("| decoder | forwards per batch | ms per batch | x plain (wall) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['forwards']:g} | {r['ms']:.0f} | {r['x']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
