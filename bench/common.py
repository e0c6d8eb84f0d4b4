"""Shared pieces of the benchmarks: machine description, timing, peak memory, JSON + Markdown output.

Every bench script is a list of *cases* (one size / preset each). By default each case runs in a fresh
subprocess of the same script (``--case NAME``), so the peak RSS reported for a case is that case's own
(ru_maxrss is a high-water mark over a process's life: cases in one process would mix their peaks).
Within one case the peak covers everything the case ran (model building, both samplers, ...).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SCHEMA = "clipgen-bench-v1"


# ------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_info(device: torch.device | None = None) -> dict:
    info = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_1min": loadavg(), "hostname": platform.node()}
    if torch.cuda.is_available():
        i = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        info["gpu"] = torch.cuda.get_device_name(i)
        info["cuda"] = torch.version.cuda
    return info


def machine_slug(info: dict | None = None) -> str:
    info = info or machine_info()
    name = info.get("gpu") or info["cpu"]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{slug.strip('-')[:40]}-{info['cores']}c"


# ------------------------------------------------------------------------------------- device, timing

def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> dict:
    """Run fn `warmup` times untimed, then `repeats` times; seconds per call: median, min, max, all."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times, "repeats": repeats, "warmup": warmup}


def timeit_interleaved(fns: list[Callable[[], object]], device: torch.device, repeats: int = 3,
                       warmup: int = 1) -> list[dict]:
    """Like timeit for several functions, run in turn (f1 f2 ... f1 f2 ...), so a machine whose speed drifts
    (a shared VM: ~40% over an evening here) slows each alike. Each dict also has `times_s` in round order,
    for per-round ratios (ratio_of_medians)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [{"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts,
             "repeats": repeats, "warmup": warmup} for ts in times]


def time_variants(fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                  first_alone: bool = False) -> tuple[list[dict], list[float]]:
    """timeit_interleaved over the variants of a case; with first_alone, each variant's first call is timed
    on its own before (a torch.compile'd variant's includes the compile). Returns (timings, first-call s)."""
    first = []
    if first_alone:
        for fn in fns:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            first.append(time.perf_counter() - t)
    return timeit_interleaved(fns, device, repeats=repeats, warmup=warmup), first


def round_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow[r] / fast[r]: the speed-up measured within each round."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident set of this process (MiB; Linux ru_maxrss is KiB) and, on CUDA, peak allocated."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_alloc_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ------------------------------------------------------------------ FLOPs, bandwidth, utilisation

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched on the name
# torch.cuda.get_device_name reports. Unknown devices (and CPUs) get no MFU, only achieved TFLOP/s.
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 SXM", 989.4), ("H100 80GB HBM3", 989.4), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("H100", 756.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
                    ("A10G", 70.0), ("T4", 65.0)]


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def gpt_train_flops_per_token(cfg) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), the PaLM convention: 6 per
    matmul weight (blocks: 12 C^2 per layer; the vocabulary head: C V) plus attention's 12 L C T, T the
    sequence length (full, not halved for causality). Embedding lookups and norms are not counted."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    T = cfg.n_prefix + cfg.n_tokens - 1
    return 6 * (12 * L * C * C + C * V) + 12 * L * C * T


def measure_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Device memory bandwidth in GB/s from a large copy (bytes read + bytes written per copy; median)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def decode_bytes_per_step(cfg, rows: int, n_steps: int, weight_bytes: int, kv_bytes: int) -> float:
    """Bytes a KV-cache decode step must read, averaged over n_steps steps of `rows` sequences: every weight
    matrix the step multiplies (blocks, final norm, vocabulary head; not the embedding tables, of which it
    reads one row each) and the cached keys and values up to the current position (average position)."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    weights = (L * (12 * C * C + 13 * C) + C * V + V + 2 * C) * weight_bytes
    mean_len = cfg.n_prefix + (n_steps - 1) / 2
    kv = 2 * L * rows * mean_len * C * kv_bytes
    return weights + kv


# --------------------------------------------------------------------------------------- arguments

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write the Markdown table here")
    p.add_argument("--cases", default=None, help="comma-separated subset of the cases to run")
    p.add_argument("--in-process", action="store_true",
                   help="run all cases in this process (peak RSS then mixes across cases)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, JSON to stdout
    return p


def setup(args) -> torch.device:
    device = torch.device(args.device or best_device())
    threads = args.threads or os.cpu_count() or 1
    args.threads = threads
    torch.set_num_threads(threads)
    return device


_CASE_MARK = "@@BENCH_CASE_JSON@@"


def run_cases(name: str, args, cases: dict[str, Callable[[], dict]], columns: list[tuple[str, str]],
              script: str, notes: list[str] | None = None) -> dict:
    """Run the selected cases (each in a fresh subprocess unless --in-process) and report them.

    A case returns a list of row dicts (or one dict). columns: (key, header) pairs for the Markdown table.
    """
    selected = [c for c in (args.cases.split(",") if args.cases else cases) if c]
    unknown = [c for c in selected if c not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(cases)}")
    if args.case is not None:  # child: run one case, print its rows as JSON
        device = setup(args)
        reset_peak(device)
        rows = cases[args.case]()
        rows = rows if isinstance(rows, list) else [rows]
        mem = peak_memory_mb(device)
        for r in rows:
            r.setdefault("case", args.case)
            r.update({k: v for k, v in mem.items() if k not in r})
        print(_CASE_MARK + json.dumps(rows), flush=True)
        return {"rows": rows}

    device = setup(args)
    load_at_start = loadavg()
    rows: list[dict] = []
    for case in selected:
        if args.in_process:
            reset_peak(device)
            got = cases[case]()
            got = got if isinstance(got, list) else [got]
            mem = peak_memory_mb(device)
            for r in got:
                r.setdefault("case", case)
                r.update({k: v for k, v in mem.items() if k not in r})
                r["peak_note"] = "in-process: peak of the process so far"
            rows += got
            continue
        cmd = [sys.executable, script, "--case", case, "--threads", str(args.threads), "--device", str(device)]
        if args.quick:
            cmd.append("--quick")
        for extra in getattr(args, "child_args", []):
            cmd.append(extra)
        print(f"[{name}] case {case} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith(_CASE_MARK)), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            rows.append({"case": case, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        rows += json.loads(line[len(_CASE_MARK):])
    result = {"schema": SCHEMA, "benchmark": name, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "device": str(device), "threads": args.threads, "quick": bool(args.quick),
              "machine": {**machine_info(device), "loadavg_1min": load_at_start, "loadavg_1min_at_end": loadavg()},
              "rows": rows, "notes": notes or [],
              "columns": [list(c) for c in columns]}
    md = markdown(result)
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    return result


# ------------------------------------------------------------------------------------------ Markdown

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"
    return str(v)


def markdown(result: dict) -> str:
    m = result["machine"]
    head = (f"### {result['benchmark']}{' (quick)' if result.get('quick') else ''}\n\n"
            f"{m.get('gpu') or m['cpu']}, {m['cores']} cores, {result['threads']} threads, device "
            f"{result['device']}, torch {m['torch']}, 1-min load {m.get('loadavg_1min')} at start, "
            f"{m.get('loadavg_1min_at_end')} at end, {result['date']}\n\n")
    cols = [tuple(c) for c in result["columns"]]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    notes = "".join(f"\n- {n}" for n in result.get("notes", []))
    return head + "\n".join(lines) + ("\n" + notes if notes else "") + "\n"
