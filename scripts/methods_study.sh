#!/usr/bin/env bash
# The low-rank family compared (docs/results/methods.md): every method on the quickstart task with the same
# steps, schedule, data order and seed, at two trainable-parameter budgets (about LoRA r = 2 and r = 8 on all
# linear layers; each method's own knob set to stay near or under it; VeRA is far smaller by design; AdaLoRA
# starts at 1.5x the rank and is pruned to it).
#   SEEDS="0" TASKS="quickstart" scripts/methods_study.sh; python3 scripts/study_report.py runs/methods-study methods
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
OUT=${OUT:-runs/methods-study}
TASKS=${TASKS:-quickstart}
SEEDS=${SEEDS:-0}
STEPS=${STEPS:-150}
mkdir -p "$OUT"
# shellcheck source=scripts/study_lib.sh
source scripts/study_lib.sh
COMMON=(--target-modules all-linear --lora-dropout 0 --learning-rate 2e-3 --max-steps "$STEPS" --seq-len 256
        --micro-batch-size 4 --warmup-steps 15 --eval-steps 10)
for task in $TASKS; do
  for seed in $SEEDS; do
    for budget in small large; do
      if [ "$budget" = small ]; then r=2; r1=1; chi=4; vr=64; dens=0.003; ar=3; else r=8; r1=4; chi=8; vr=256; dens=0.02; ar=12; fi
      study_run "$task" "$budget" lora "$seed" -- --r "$r" --lora-alpha "$((2 * r))"
      study_run "$task" "$budget" rslora "$seed" -- --r "$r" --lora-alpha "$((2 * r))" --use-rslora true
      study_run "$task" "$budget" loraplus "$seed" -- --r "$r" --lora-alpha "$((2 * r))" --loraplus-lr-ratio 16
      study_run "$task" "$budget" dora "$seed" -- --r "$r" --lora-alpha "$((2 * r))" --use-dora true
      study_run "$task" "$budget" pissa "$seed" -- --r "$r" --lora-alpha "$((2 * r))" --init-lora-weights pissa_niter_4
      study_run "$task" "$budget" eva "$seed" -- --r "$r" --lora-alpha "$((2 * r))" --init-lora-weights eva
      study_run "$task" "$budget" vera "$seed" -- --method vera --r "$vr"
      study_run "$task" "$budget" rosa "$seed" -- --method rosa --r "$r1" --lora-alpha "$((2 * r1))" --sparse-density "$dens"
      study_run "$task" "$budget" multilora "$seed" -- --method multilora --r "$r1" --lora-alpha "$((2 * r1))"
      study_run "$task" "$budget" glora "$seed" -- --method glora --r "$r1"
      study_run "$task" "$budget" mpo "$seed" -- --method mpo --bond-dim "$chi"
      study_run "$task" "$budget" adalora "$seed" -- --method adalora --init-r "$ar" --target-r "$r" \
        --lora-alpha "$((2 * r))" --tinit 15 --tfinal 15
    done
  done
done
