#!/usr/bin/env bash
# Every GPU case of the benchmarks in one run, made to finish in under 5 minutes on an H100-class GPU (each
# stage has its own time limit, so the script ends in time even where a stage does not), so that one call of
# a lent GPU gives all the numbers:
#   sampling     64 candidates of CLIP-GEN's gpt2-medium GPT, 256 tokens each (target: <= 1 s), plain, CUDA-graph
#                decode steps and SJD, against the naive sampler (bench/sampling.py, case gpt2-medium-64)
#   train_gpt    gpt2-medium training step in bf16, eager and torch.compile'd: MFU (target: >= 40%)
#   train_vqgan  the VQGAN's GAN step, Shapes and f16-16384 sizes
#
#   bash bench/gpu.sh [RESULTS_DIR]        # default: $OUT if set (the device tool's folder), else bench/results/gpu
#
# Results: <stage>.json (the bench's JSON, Markdown table in it and in the log) and <stage>.log per stage, and
# machine.txt. The GPU machine has PyTorch but not open_clip (and ftfy, wcwidth, lpips): `make gpu-wheels`
# downloads their wheels into .whl/ here, and this script installs them from there where they are missing.
# BENCH_DEVICE=cpu BENCH_QUICK=1 runs the same stages with the benches' --quick sizes on a CPU (a smoke test
# of this script; tests/test_bench.py runs it).
set -u -o pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-bench/results/gpu}}
PY=${PY:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import open_clip, ftfy, lpips" 2> /dev/null && ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        .whl/*.whl || { echo "bench/gpu.sh: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - "$DEVICE" <<'PYEOF' || exit 2
import sys
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); run it where a GPU is lent")
try:
    import einops, open_clip  # noqa: F401
except ImportError as e:
    sys.exit(f"bench/gpu.sh: {e.name} is missing; run `make gpu-wheels` where pip works and bring .whl/ along")
PYEOF
{ date -Is; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import torch; print('torch', torch.__version__)"; } \
    > "$DIR/machine.txt"

if [ -n "${BENCH_QUICK:-}" ]; then   # the CPU smoke test: small cases, limits a slow 2-core VM can keep
    QUICK=--quick SAMPLING=tiny-random TRAIN_GPT=tiny TRAIN_VQGAN=shapes SCALE=4
else
    QUICK= SAMPLING=gpt2-medium-64 TRAIN_GPT=gpt2-medium-mfu TRAIN_VQGAN=shapes,f16-16384 SCALE=1
fi
failed=0
stage() {  # stage NAME SECONDS SCRIPT CASES
    local name=$1 limit=$2 script=$3 cases=$4 start rc
    start=$(date +%s) limit=$(( limit * SCALE ))
    echo "== $name: $script --cases $cases (at most ${limit} s)"
    timeout "$limit" "$PY" "$script" --device "$DEVICE" --cases "$cases" $QUICK --json "$DIR/$name.json" \
        > "$DIR/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (time limit)')"
    grep '^|' "$DIR/$name.log" | cut -c1-400
    [ "$rc" = 0 ] || { failed=1; tail -n 20 "$DIR/$name.log"; }
}
stage sampling 150 bench/sampling.py "$SAMPLING"
stage train_gpt 110 bench/train_gpt.py "$TRAIN_GPT"
stage train_vqgan 35 bench/train_vqgan.py "$TRAIN_VQGAN"
exit $failed
