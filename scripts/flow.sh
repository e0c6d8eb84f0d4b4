#!/usr/bin/env bash
# The flow-matching prior beside a world's shipped GPT: pre-encode the world with the shipped VQGAN and CLIP,
# train the flow prior (train_gpt.py --model flow), export pretrained/<world>/flow.safetensors, then evaluate
# it beside the GPT on the same prompts.
#   make flow WORLD=shapes           (or: WORLD=scenes bash scripts/flow.sh)
# Variables: PY (python), WORLD (shapes or scenes), OUT (work folder, default runs/flow-WORLD), DEST (default
# pretrained/WORLD), FLOW_ARGS (replaces the recipe), EVAL_PROMPTS (0 = skip the evaluation). Every stage
# resumes if re-run after a stop.
source "$(dirname "$0")/common.sh"
WORLD=${WORLD:-shapes}
OUT=${OUT:-runs/flow-$WORLD}
DEST=${DEST:-pretrained/$WORLD}
# The recipe (FLOW_ARGS replaces it) and the ODE steps the exported file samples with by default (STEPS).
case "$WORLD" in
    shapes) DATA=(--dataset shapes); EVAL_PROMPTS=${EVAL_PROMPTS:-200}; EVAL=(--fd-real 0); NOISE=0.1
            STEPS=${STEPS:-8} ;;
    scenes) DATA=(--dataset scenes --shapes-train-size 40960); EVAL_PROMPTS=${EVAL_PROMPTS:-100}; EVAL=(--world scenes)
            NOISE=0; STEPS=${STEPS:-16} ;;
    *) echo "error: WORLD must be shapes or scenes, not $WORLD" >&2; exit 2 ;;
esac
RECIPE=${FLOW_ARGS:---preset tiny --dropout 0 --lr 1e-3 --max-steps 6000 --warmup-steps 200 --embed-noise $NOISE --flow-time uniform --sample-every 100000}
M=(--vqgan "$DEST/vqgan.safetensors" --clip "$DEST/clip.safetensors")
mkdir -p "$OUT"

stage "1/3 pre-encoding the unlabeled $WORLD with $DEST's VQGAN and CLIP"
$PY preencode.py "${DATA[@]}" "${M[@]}" --out "$OUT/encoded"
stage "2/3 the flow prior (CLIP image embeddings only)"
# shellcheck disable=SC2086
$PY train_gpt.py --model flow "${M[@]}" --shards "$OUT/encoded" --out-dir "$OUT/flow" --no-tensorboard \
    --resume auto $RECIPE
stage "3/3 export to $DEST/flow.safetensors"
$PY export.py "$OUT/flow/latest.pt" "$DEST/flow.safetensors" --flow-steps "$STEPS"
if [ "$EVAL_PROMPTS" -gt 0 ]; then
    for prior in gpt flow; do
        stage "evaluate.py: the $prior prior"
        $PY evaluate.py "${EVAL[@]}" "${M[@]}" --gpt "$DEST/$prior.safetensors" --prompts "$EVAL_PROMPTS" \
            --json "$OUT/eval-$prior.json"
    done
fi
stage "finished"
