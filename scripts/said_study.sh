#!/usr/bin/env bash
# SAID intrinsic dimension of two embedded tasks on two models (docs/results/said.md): the embedded model
# (assets/pretrain.toml, 1,000 pre-training steps) and the same recipe stopped at 250 steps, which tests the
# paper's claim that more pre-training lowers the intrinsic dimension. Each analysis trains a full fine-tune
# (lr 1e-3) and SAID at every d (lr 1e-2) on q_proj/v_proj (the default targets, 8 layers), STEPS steps each,
# and scores held-out next-token accuracy on the task's validation file; d90 is the smallest d reaching 90% of
# the full fine-tune's accuracy. One analysis per model, task and seed (the seed sets the data order and the
# Fastfood projections).
#
#   bash scripts/said_study.sh [OUT] [SEEDS]     # default runs/said, "0 1 2"; then
#   python3 scripts/said_report.py OUT           # writes docs/results/said.md and said.png
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FACTUNE:-target/release/factune}
OUT=${1:-runs/said}
SEEDS=${2:-0 1 2}
STEPS=${STEPS:-60}
DIMS=10,30,100,300,1000,3000,10000,30000
mkdir -p "$OUT"
LESS=$OUT/model-250
if [ ! -f "$LESS/model.safetensors" ]; then
  sed 's/^max_steps = 1000$/max_steps = 250/' assets/pretrain.toml >"$OUT/pretrain-250.toml"
  grep -q '^max_steps = 250$' "$OUT/pretrain-250.toml"
  "$F" pretrain --config "$OUT/pretrain-250.toml" --data assets/data/pretrain.txt --output "$LESS" \
    >"$OUT/pretrain-250.log" 2>&1
fi
for model in assets/default-model "$LESS"; do
  for task in quickstart reverse; do
    for seed in $SEEDS; do
      run=$OUT/$(basename "$model")-$task-s$seed
      [ -f "$run/said.json" ] && continue
      echo "== $run" >&2
      "$F" analyze said --model "$model" --data "assets/data/$task-train.jsonl" \
        --eval-data "assets/data/$task-valid.jsonl" --output "$run" --overwrite --dims "$DIMS" \
        --max-steps "$STEPS" --learning-rate 1e-2 --full-learning-rate 1e-3 \
        --seed "$seed" --data-seed "$seed" --fastfood-seed "$seed" >"$run.log" 2>"$run.err"
    done
  done
done
