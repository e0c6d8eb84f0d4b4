"""demo.py wall time, loading included: `python demo.py --text "..." --cand-size N` in a subprocess, N = 16
and 64 on the shipped Shapes models, 3 runs each (median, min, max), with demo.py's own split of the time
(imports / loading / sampling) parsed from its summary line.

    python bench/demo.py --runs 3
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402

TEXT = "a large red circle in the top left"
SUMMARY = re.compile(r"in ([\d.]+) s \(imports ([\d.]+) s, loading ([\d.]+) s, sampling ([\d.]+) s\) on (\S+)")


def run_case(n: int, args, device: torch.device) -> dict:
    walls, splits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            cmd = [sys.executable, "demo.py", "--text", TEXT, "--cand-size", str(n), "--out",
                   str(Path(tmp) / "sample.png"), "--quiet", "--device", str(device)]
            if args.demo_threads:
                cmd += ["--threads", str(args.demo_threads)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True, env=dict(os.environ))
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise RuntimeError(f"demo.py failed: {proc.stderr.strip()[-500:]}")
            m = SUMMARY.search(proc.stdout)
            if m is None:
                raise RuntimeError(f"no summary line in demo.py's output: {proc.stdout[-500:]}")
            splits.append([float(x) for x in m.groups()[:4]])
    med = lambda i: statistics.median(s[i] for s in splits)  # noqa: E731
    return {"cand_size": n, "runs": args.runs, "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
            "wall_max_s": max(walls), "demo_total_s": med(0), "imports_s": med(1), "loading_s": med(2),
            "sampling_s": med(3), "demo_threads": args.demo_threads or "demo default",
            "images_per_s_sampling": n / med(3) if med(3) > 0 else None}


COLUMNS = [("cand_size", "--cand-size"), ("runs", "runs"), ("wall_median_s", "wall s (median)"),
           ("wall_min_s", "min"), ("wall_max_s", "max"), ("imports_s", "imports s"), ("loading_s", "loading s"),
           ("sampling_s", "sampling s"), ("demo_threads", "threads")]
NOTES = [f'`python demo.py --text "{TEXT}" --cand-size N --quiet` in a fresh subprocess per run; wall = process '
         "start to exit (interpreter start included); imports/loading/sampling: medians of demo.py's own summary line "
         "(sampling includes VQGAN decoding, CLIP re-ranking and writing the PNGs).",
         "threads: demo.py's own default (1 for a GPT up to its small-width limit) unless --demo-threads is given; "
         "the bench's --threads does not apply to the subprocess."]


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="runs per size (default 3; --quick: 1)")
    p.add_argument("--demo-threads", type=int, default=None, help="pass --threads to demo.py")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.in_process = True  # each run is already its own subprocess
    device = torch.device(args.device or C.best_device())
    sizes = [4] if args.quick else [16, 64]
    cases = {f"cand{n}": (lambda n=n: run_case(n, args, device)) for n in sizes}
    res = C.run_cases("demo", args, cases, [("case", "case")] + COLUMNS, __file__, NOTES)
    return res


if __name__ == "__main__":
    main()
