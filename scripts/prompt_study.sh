#!/usr/bin/env bash
# The prompt family against LoRA (docs/results/prompt.md): prompt tuning (random and text init), P-tuning,
# prefix tuning with and without the projection, 20 virtual tokens each (their natural size), and LoRA r = 2 on
# every linear layer (27,136 parameters); then at LoRA's budget ("matched"): prefix tuning with 53 virtual tokens,
# P-tuning and the prefix projection with encoders sized to about 27k parameters (prompt tuning would need 141
# virtual tokens, more than half the embedded model's context, so it has no matched run). Same steps, schedule,
# data order and seeds for all; seq_len 224 leaves room for the virtual tokens in the 256-position context.
#   SEEDS="0 1 2" scripts/prompt_study.sh; python3 scripts/study_report.py runs/prompt-study prompt
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
OUT=${OUT:-runs/prompt-study}
TASKS=${TASKS:-quickstart reverse}
SEEDS=${SEEDS:-0}
STEPS=${STEPS:-150}
mkdir -p "$OUT"
# shellcheck source=scripts/study_lib.sh
source scripts/study_lib.sh
COMMON=(--max-steps "$STEPS" --seq-len 224 --micro-batch-size 4 --warmup-steps 15 --eval-steps 10)
P=(--num-virtual-tokens 20 --learning-rate 1e-2)
for task in $TASKS; do
  for seed in $SEEDS; do
    study_run "$task" natural lora "$seed" -- --target-modules all-linear --lora-dropout 0 --r 2 --lora-alpha 4 \
      --learning-rate 2e-3
    study_run "$task" natural prompt "$seed" -- --peft-type PROMPT_TUNING "${P[@]}"
    study_run "$task" natural prompt-text "$seed" -- --peft-type PROMPT_TUNING "${P[@]}" \
      --prompt-tuning-init TEXT --prompt-tuning-init-text "Answer the question about the story in a few words."
    study_run "$task" natural ptuning "$seed" -- --peft-type P_TUNING "${P[@]}"
    study_run "$task" natural prefix "$seed" -- --peft-type PREFIX_TUNING "${P[@]}"
    study_run "$task" natural prefix-proj "$seed" -- --peft-type PREFIX_TUNING "${P[@]}" --prefix-projection true
    study_run "$task" matched prefix "$seed" -- --peft-type PREFIX_TUNING --num-virtual-tokens 53 --learning-rate 1e-2
    study_run "$task" matched ptuning "$seed" -- --peft-type P_TUNING "${P[@]}" --encoder-hidden-size 52
    study_run "$task" matched prefix-proj "$seed" -- --peft-type PREFIX_TUNING "${P[@]}" --prefix-projection true \
      --encoder-hidden-size 44
  done
done
