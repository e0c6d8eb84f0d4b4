"""Run every benchmark and write bench/results/<machine>-<date>.json and .md (what `make bench` runs).

    python bench/run_all.py                      # all, full sizes, best device, all cores
    python bench/run_all.py --only sampling,demo --threads 2
    python bench/run_all.py --quick --out-dir /tmp/bench   # tiny sizes (what tests/test_bench.py runs)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as C  # noqa: E402

BENCHES = ["sampling", "train_gpt", "demo", "train_vqgan"]  # in order of importance


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help=f"comma-separated subset of {BENCHES}")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(C.REPO / "bench" / "results"))
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHES
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            js = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(C.REPO / "bench" / f"{name}.py"), "--json", str(js)]
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--quick"] if args.quick else []
            print(f"== {name}", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd, cwd=C.REPO).returncode
            if rc != 0 or not js.is_file():
                failed.append(name)
                results[name] = {"benchmark": name, "error": f"exit status {rc}"}
            else:
                results[name] = json.loads(js.read_text())
    info = C.machine_info()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"{C.machine_slug(info)}-{stamp}{'-quick' if args.quick else ''}"
    doc = {"schema": C.SCHEMA, "date": stamp, "machine": info, "benchmarks": results, "failed": failed}
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = [f"# Benchmarks, {info['cpu']}{' / ' + info['gpu'] if info.get('gpu') else ''}, {info['cores']} cores, "
          f"torch {info['torch']}, {stamp}\n"]
    for name in names:
        r = results[name]
        md.append(C.markdown(r) if "rows" in r else f"### {name}\n\nfailed: {r['error']}\n")
    base.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}", file=sys.stderr)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return base.with_suffix(".json")


if __name__ == "__main__":
    main()
