#!/usr/bin/env bash
# Reproduces bild/drafts/smollm2-135m from scratch (CPU; every step is resumable: re-run after an interruption).
#
#   1. held-out teacher cache: SmolLM2-135M's greedy continuations (128 tokens) of 72 held-out ShareGPT
#      prompts (63 fit in 256 prompt tokens; 7,106 target tokens) -- the set α is measured on;
#   2. calibration teacher cache: the same for calibration prompts, with the big model's top-32 logits;
#   3. build: 2-layer shallow draft initialised from big layers 0 and 1, 8,192-token head
#      (most frequent tokens of calibration ShareGPT text), embeddings/head shared with the big model;
#   4. BiLD prediction alignment: top-k token KD + sequence KD on the cached greedy outputs, lr 1e-3, batch 8;
#   5. export the best held-out checkpoint with its metrics.
#
# The shipped run differs in one respect: its calibration cache was still being generated while it trained
# (`--grow` re-reads it at every epoch), so early epochs saw fewer shards. Here all shards exist first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/default_draft}
OUT=${OUT:-bild/drafts/smollm2-135m}
SHARDS=${SHARDS:-4}      # calibration shards (256 prompts each) the shipped draft was trained on
STEPS=${STEPS:-1035}         # training steps of the shipped draft's best checkpoint
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

$PY -m bild.draft_cli draft teacher runs/teacher_heldout --split heldout --n-prompts 72 --batch-size 24
$PY -m bild.draft_cli draft teacher runs/teacher_cal --split calibration --n-prompts 4000 --batch-size 32 \
    --max-shards "$SHARDS"
[ -d "$RUN/draft_init" ] || $PY -m bild.draft_cli draft build --run "$RUN" --layers 2 --init first \
    --vocab 8192 --vocab-from text
$PY -m bild.draft_cli draft train "$RUN" --data aligned --teacher-dir runs/teacher_cal --teacher-shards "$SHARDS" \
    --heldout-dir runs/teacher_heldout --lr 1e-3 --batch-size 8 --warmup 5 --seed 0 \
    --max-steps "$STEPS" --minutes 100000 --eval-every 4 --ckpt-every 4
$PY -m bild.draft_cli draft export "$RUN" "$OUT" --heldout-dir runs/teacher_heldout
