#!/usr/bin/env bash
# Reproduce pretrained/scenes/ from nothing: CLIP and VQGAN (side by side: one thread and two), pre-encoding,
# the language-free GPT, export, evaluation. Sized for 2 CPU cores.
#   make scenes                      (or: bash scripts/scenes.sh)
# Variables: PY (python), OUT (work folder, default runs/scenes), DEST (default pretrained/scenes),
# EVAL_PROMPTS (prompts per category for the closing evaluation, 0 = skip), SUPERVISED=1 (also the
# supervised --cond text GPT on the captioned split, the comparison; not part of the shipped files),
# GPT_ARGS (replaces the GPT recipe). Every stage resumes if re-run after a stop.
source "$(dirname "$0")/common.sh"
OUT=${OUT:-runs/scenes}
DEST=${DEST:-pretrained/scenes}
EVAL_PROMPTS=${EVAL_PROMPTS:-100}
SUPERVISED=${SUPERVISED:-0}
TRAIN_SIZE=${TRAIN_SIZE:-40960}
GPT_RECIPE=${GPT_ARGS:---preset tiny --dropout 0 --lr 1e-3 --max-steps 7000 --warmup-steps 100 --embed-noise 0 --sample-every 100000}
mkdir -p "$OUT" "$DEST"

stage "1/5 CLIP on the captioned scenes (one thread) and VQGAN on the unlabeled scenes (two), side by side"
OMP_NUM_THREADS=1 $PY train_clip.py --preset scenes --out-dir "$OUT/clip" --no-tensorboard --resume auto \
    > "$OUT/clip.log" 2>&1 &
clip_pid=$!
OMP_NUM_THREADS=2 $PY train_vqgan.py --preset scenes --dataset scenes --out-dir "$OUT/vqgan" --no-tensorboard \
    --resume auto > "$OUT/vqgan.log" 2>&1 &
vqgan_pid=$!
status=0
wait $clip_pid || { status=$?; echo "CLIP training failed (exit $status); see $OUT/clip.log" >&2; }
wait $vqgan_pid || { status=$?; echo "VQGAN training failed (exit $status); see $OUT/vqgan.log" >&2; }
[ "$status" -eq 0 ] || exit "$status"
tail -n 1 "$OUT/clip.log"
tail -n 1 "$OUT/vqgan.log"
stage "2/5 pre-encoding $TRAIN_SIZE unlabeled scenes (tokens + CLIP image embeddings)"
$PY preencode.py --dataset scenes --shapes-train-size "$TRAIN_SIZE" --vqgan "$OUT/vqgan/best.pt" \
    --clip "$OUT/clip/best.pt" --out "$OUT/encoded"
stage "3/5 language-free GPT (CLIP image embeddings only)"
# shellcheck disable=SC2086
$PY train_gpt.py --vqgan "$OUT/vqgan/best.pt" --clip "$OUT/clip/best.pt" --shards "$OUT/encoded" \
    --out-dir "$OUT/gpt" --no-tensorboard --resume auto $GPT_RECIPE
stage "4/5 export to $DEST (fp16 safetensors)"
$PY export.py "$OUT/clip/best.pt" "$DEST/clip.safetensors"
$PY export.py "$OUT/vqgan/best.pt" "$DEST/vqgan.safetensors"
$PY export.py "$OUT/gpt/latest.pt" "$DEST/gpt.safetensors"
stage "done: $DEST (checkpoints reproduced; the rest is the evaluation)"
du -ch "$DEST"/*.safetensors | tail -1
if [ "$SUPERVISED" = 1 ]; then
    stage "supervised comparison: --cond text GPT on the captioned scenes (same recipe)"
    $PY preencode.py --dataset scenes --shapes-split captioned --shapes-train-size "$TRAIN_SIZE" \
        --vqgan "$OUT/vqgan/best.pt" --clip "$OUT/clip/best.pt" --out "$OUT/encoded-captioned"
    # shellcheck disable=SC2086
    $PY train_gpt.py --vqgan "$OUT/vqgan/best.pt" --clip "$OUT/clip/best.pt" --shards "$OUT/encoded-captioned" \
        --cond text --out-dir "$OUT/gpt-supervised" --no-tensorboard --resume auto $GPT_RECIPE --embed-noise 0
fi
if [ "$EVAL_PROMPTS" -gt 0 ]; then
    stage "5/5 evaluate.py --world scenes on the exported files"
    $PY evaluate.py --world scenes --vqgan "$DEST/vqgan.safetensors" --gpt "$DEST/gpt.safetensors" \
        --clip "$DEST/clip.safetensors" --prompts "$EVAL_PROMPTS" --json "$OUT/eval.json"
fi
stage "finished"
