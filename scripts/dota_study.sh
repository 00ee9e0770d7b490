#!/usr/bin/env bash
# DoTA in miniature (docs/results/dota.md): tensor-train adapters initialised from the weights (DoTA) against the
# same cores at random (last core zero), LoRA and QDoTA (DoTA on an NF4 base), at matched trainable-parameter
# budgets (MPO bond dimension CHI vs LoRA rank R, MPO never larger), on the quickstart task and on a harder one
# (reverse the words of a sentence, scripts/make_reverse_task.py); same steps, data order and seeds 0 1 2.
#   BUDGETS="2:4 4:6" TASKS="quickstart reverse" SEEDS="0 1 2" scripts/dota_study.sh
#   python3 scripts/study_report.py runs/dota-study dota
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
OUT=${OUT:-runs/dota-study}
BUDGETS=${BUDGETS:-"2:4"}
TASKS=${TASKS:-"quickstart reverse"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-150}
mkdir -p "$OUT"
# shellcheck source=scripts/study_lib.sh
source scripts/study_lib.sh
COMMON=(--target-modules all-linear --lora-dropout 0 --learning-rate 2e-3 --max-steps "$STEPS" --seq-len 256
        --micro-batch-size 4 --warmup-steps 15 --eval-steps 10)
for task in $TASKS; do
  for budget in $BUDGETS; do
    r=${budget%%:*}; chi=${budget##*:}; b="r$r/chi$chi"
    for method in lora dota random qdota; do
      for seed in $SEEDS; do
        case $method in
          lora) study_run "$task" "$b" lora "$seed" -- --method lora --r "$r" --lora-alpha "$((2 * r))" ;;
          dota) study_run "$task" "$b" dota "$seed" -- --method mpo --bond-dim "$chi" ;;
          random) study_run "$task" "$b" random "$seed" -- --method mpo --bond-dim "$chi" --init-weights random ;;
          qdota) study_run "$task" "$b" qdota "$seed" -- --method mpo --bond-dim "$chi" --quantize nf4 ;;
        esac
      done
    done
  done
done
