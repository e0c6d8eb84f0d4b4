#!/usr/bin/env bash
# The README's ablation table: evaluate.py on 200 prompts naming all four attributes, 16 samples each.
#   bash scripts/ablation.sh LABEL=GPT_CHECKPOINT ...      (the first one is also run at guidance 2 and 3)
# Variables: VQGAN, CLIP (the frozen stages), OUT (JSON folder), PROMPTS (200), PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VQGAN=${VQGAN:-pretrained/shapes/vqgan.safetensors}
CLIP=${CLIP:-pretrained/shapes/clip.safetensors}
OUT=${OUT:-runs/ablation}
PROMPTS=${PROMPTS:-200}
mkdir -p "$OUT"
rows=()
first=1
for pair in "$@"; do
    label=${pair%%=*}; gpt=${pair#*=}
    scales="1"; [ $first = 1 ] && scales="1 2 3"; first=0
    for s in $scales; do
        json="$OUT/$(echo "$label" | tr -c 'A-Za-z0-9.\n' '_')-cfg$s.json"
        [ -f "$json" ] || $PY evaluate.py --vqgan "$VQGAN" --clip "$CLIP" --gpt "$gpt" --prompts "$PROMPTS" \
            --cfg-scale "$s" --json "$json" > /dev/null
        rows+=("$label=$json")
    done
done
$PY scripts/ablation_table.py "${rows[@]}"
