#!/usr/bin/env bash
# Reproduces bild/drafts/smollm2-135m-feature, a feature draft (EAGLE-style: one layer reading SmolLM2's final
# hidden states), from scratch on CPU. Every step is resumable: re-run after an interruption.
#
#   1. held-out teacher cache with features: SmolLM2's greedy continuations (128 tokens) of 72 held-out ShareGPT
#      prompts (63 fit in 256 prompt tokens) — the α measurement set;
#   2. aligned calibration cache with features: the same for the first 256 calibration prompts (one shard);
#   3. text calibration cache with features: one native prefill per 256-token chunk of calibration ShareGPT
#      conversations (no generation, ~3x more positions per second than greedy decoding on the 2-core CPU);
#   4. build: one layer initialised from big layer 29, fc = [0; I], output norm = the big final norm, 8,192-token
#      head (most frequent tokens of calibration text; the big model's rows);
#   5. train, phase 1 on the aligned shard alone, phase 2 on aligned + text shards: token KD to the big model's
#      softmax over the kept ids, sequence KD to its greedy token, smooth-L1 feature regression, lr 1e-3, batch 8;
#   6. export the best held-out checkpoint with its metrics.
#
# The shipped run differs in one respect: phase 2 trained while the text cache was still being generated (`--grow`
# re-reads it at every epoch), so its early epochs saw fewer text shards. Here all shards exist first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/feature_draft}
OUT=${OUT:-bild/drafts/smollm2-135m-feature}
TEXT_SHARDS=${TEXT_SHARDS:-TEXT_SHARDS_USED}
PHASE1_STEPS=${PHASE1_STEPS:-303}
TOTAL_STEPS=${TOTAL_STEPS:-TOTAL_STEPS_USED}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CLI="$PY -m bild.draft_cli"

$CLI draft teacher runs/feat_heldout --split heldout --n-prompts 72 --batch-size 24 --features
$CLI draft teacher runs/feat_cal --split calibration --n-prompts 9150 --batch-size 32 --features --max-shards 1
$CLI draft teacher runs/feat_mix --source text --features --text-tokens 2000000 --batch-size 16 \
    --max-shards "$TEXT_SHARDS" --threads 1
ln -sf ../feat_cal/shard_0000.pt runs/feat_mix/shard_a0000.pt
[ -f "$RUN/draft_init/bild_draft.json" ] || $CLI draft build --run "$RUN" --kind feature --vocab 8192 --vocab-from text
TRAIN="$CLI draft train $RUN --heldout-dir runs/feat_heldout --lr 1e-3 --batch-size 8 --warmup 20 --seed 0
       --minutes 100000 --threads 1"
$TRAIN --teacher-dir runs/feat_cal --max-steps "$PHASE1_STEPS" --eval-every 1.5 --ckpt-every 2
$TRAIN --teacher-dir runs/feat_mix --max-steps "$TOTAL_STEPS" --eval-every 3 --ckpt-every 3
$CLI draft export "$RUN" "$OUT" --heldout-dir runs/feat_heldout --threads 2
