#!/usr/bin/env bash
# Reproduce pretrained/shapes/ from nothing: CLIP, VQGAN, pre-encoding, GPT, export, evaluation.
#   make shapes                      (or: bash scripts/shapes.sh)
# Variables: PY (python), OUT (work folder, default runs/shapes), DEST (default pretrained/shapes),
# EVAL_PROMPTS (prompts for the closing evaluation, 0 = skip). Every stage resumes if re-run after a stop.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/shapes}
DEST=${DEST:-pretrained/shapes}
EVAL_PROMPTS=${EVAL_PROMPTS:-200}
mkdir -p "$OUT" "$DEST"

stage "1/5 CLIP on the captioned split"
$PY train_clip.py --preset shapes --out-dir "$OUT/clip" --no-tensorboard --resume auto
stage "2/5 VQGAN on the unlabeled split"
$PY train_vqgan.py --preset shapes --out-dir "$OUT/vqgan" --no-tensorboard --resume auto
stage "3/5 pre-encoding the unlabeled split (tokens + CLIP image embeddings)"
$PY preencode.py --vqgan "$OUT/vqgan/best.pt" --clip "$OUT/clip/best.pt" --out "$OUT/encoded"
stage "4/5 language-free GPT (CLIP image embeddings only)"
$PY train_gpt.py --preset tiny --vqgan "$OUT/vqgan/best.pt" --clip "$OUT/clip/best.pt" --shards "$OUT/encoded" \
    --out-dir "$OUT/gpt" --no-tensorboard --resume auto \
    ${GPT_ARGS:---dropout 0 --lr 1e-3 --max-steps 2000 --warmup-steps 200 --embed-noise 0.1 --sample-every 2000}
stage "5/5 export to $DEST (fp16 safetensors)"
$PY export.py "$OUT/clip/best.pt" "$DEST/clip.safetensors"
$PY export.py "$OUT/vqgan/best.pt" "$DEST/vqgan.safetensors"
$PY export.py "$OUT/gpt/latest.pt" "$DEST/gpt.safetensors"
stage "done: $DEST (checkpoints reproduced; the rest is the evaluation)"
du -ch "$DEST"/*.safetensors | tail -1
if [ "$EVAL_PROMPTS" -gt 0 ]; then
    $PY evaluate.py --vqgan "$DEST/vqgan.safetensors" --gpt "$DEST/gpt.safetensors" --clip "$DEST/clip.safetensors" \
        --prompts "$EVAL_PROMPTS" --json "$OUT/eval.json"
fi
stage "finished"
