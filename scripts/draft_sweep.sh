#!/usr/bin/env bash
# The draft design sweep (issue: little models): five designs trained with one recipe and one budget, then
# measured side by side with the shipped default draft and the untrained early exit.
#
#   data     the big model's greedy continuations of calibration ShareGPT prompts (native bf16 teacher cache,
#            the first 8 shards = 2,048 prompts), α on the held-out teacher cache (72 prompts)
#   recipe   aligned top-k KD + sequence KD, lr 1e-3 constant, batch 8, 200 steps, seed 0
#   measure  10 held-out prompts x 128 new tokens, greedy, gamma 3, native engine, interleaved per prompt
#
# Every step resumes: re-run after an interruption. Output: $OUT/designs.md and designs.json (the 2026-11-22 run
# is in benchmarks/results/2026-11-22-avx512bf16-draft-sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/$(date +%F)-draft-sweep}
RUN=${RUN:-runs/draft-sweep}
TEACHER=${TEACHER:-runs/teacher_cal_bf16}
HELDOUT=${HELDOUT:-runs/teacher_heldout_bf16}
THREADS=${THREADS:-2}
export OMP_NUM_THREADS=$THREADS

$PY -m bild.cli draft teacher "$HELDOUT" --split heldout --n-prompts 72 --batch-size 24 --threads "$THREADS"
$PY -m bild.cli draft teacher "$TEACHER" --split calibration --n-prompts 9150 --batch-size 32 \
    --max-shards 8 --threads "$THREADS"
RECIPES='[{"name": "1L-8k", "n_layers": 1, "init": "first", "vocab": 8192},
          {"name": "2L-8k", "n_layers": 2, "init": "first", "vocab": 8192},
          {"name": "2L-full", "n_layers": 2, "init": "first", "vocab": 0},
          {"name": "4L-8k", "n_layers": 4, "init": "first", "vocab": 8192},
          {"name": "exit4-8k", "kind": "early_exit", "n_layers": 4, "vocab": 8192}]'
# train each recipe (skipped once exported), then measure; the sweep's own runs live in $RUN
$PY -m bild.cli draft sweep "$RUN" --recipes "$RECIPES" --teacher-dir "$TEACHER" --teacher-shards 8 \
    --heldout-dir "$HELDOUT" --lr 1e-3 --batch-size 8 --max-steps 200 --minutes 1000 --eval-every 100 \
    --ckpt-every 2 --seed 0 --threads "$THREADS" \
    --drafts default=bild/drafts/smollm2-135m untrained-exit2=early-exit:2 --prompts 10 --gamma 3
mkdir -p "$OUT" && cp "$RUN"/designs.md "$RUN"/designs.json "$OUT"/
