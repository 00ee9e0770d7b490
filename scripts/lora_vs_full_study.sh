#!/usr/bin/env bash
# LoRA against full fine-tuning in miniature (docs/results/lora-vs-full.md), after Shuttleworth et al. 2024
# ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"): the embedded model fine-tuned on the quickstart
# questions by LoRA at r = 1, 4, 16, 64 (lora_alpha = 8 fixed, with and without rsLoRA) and by full
# fine-tuning, each scored on the task (exact match on the 100 validation questions), on pre-training text
# (perplexity on the first 200 KB of the corpus the model was pre-trained on: what it forgets), and by
# its intruder dimensions (factune analyze intruders, top 10, ε = 0.5, with the ε sweep); then PEFT's
# reduction (--reduce λ) of the r = 4 adapter at λ = 0.75, 0.5, 0.
#
#   bash scripts/lora_vs_full_study.sh [OUT] [SEEDS]   # default runs/lora-vs-full, "1 2 3"; then
#   /path/to/python scripts/lora_vs_full_report.py OUT # tables, and OUT/intruders-sweep.png (matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FACTUNE:-target/release/factune}
OUT=${1:-runs/lora-vs-full}
SEEDS=${2:-1 2 3}
M=assets/default-model
mkdir -p "$OUT"
head -c 200000 assets/data/pretrain.txt >"$OUT/pretrain-head.txt"
TRAIN=(--data assets/data/quickstart-train.jsonl --eval-data assets/data/quickstart-valid.jsonl
       --max-steps 150 --micro-batch-size 4)

measure() { # name dir adapter-or-"" → a JSON line in results.jsonl
  local a=() ; [ -n "$3" ] && a=(--adapter "$3")
  local em ppl
  em=$("$F" eval --model "$4" "${a[@]}" --data assets/data/quickstart-valid.jsonl --task exact-match --json 2>/dev/null)
  ppl=$("$F" eval --model "$4" "${a[@]}" --data "$OUT/pretrain-head.txt" --task perplexity --seq-len 256 --json 2>/dev/null)
  echo "{\"run\":\"$1\",\"seed\":$seed,\"exact_match\":$em,\"pretrain\":$ppl,\"intruders\":$(cat "$2/intruders.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ["intruders","layers_with_intruders","sweep"]}))')}" >>"$OUT/results.jsonl"
}

: >"$OUT/results.jsonl"
for seed in $SEEDS; do
  R=$OUT/seed$seed
  mkdir -p "$R"
  echo "{\"run\":\"base\",\"seed\":$seed,\"exact_match\":$("$F" eval --model $M --data assets/data/quickstart-valid.jsonl --task exact-match --json 2>/dev/null),\"pretrain\":$("$F" eval --model $M --data "$OUT/pretrain-head.txt" --task perplexity --seq-len 256 --json 2>/dev/null)}" >>"$OUT/results.jsonl"
  for rs in false true; do
    for r in 1 4 16 64; do
      name=lora-r$r; [ $rs = true ] && name=rslora-r$r
      d=$R/$name
      [ -e "$d/adapter_model.safetensors" ] || "$F" train --model $M --output "$d" "${TRAIN[@]}" --r $r \
        --lora-alpha 8 --use-rslora $rs --target-modules all-linear --learning-rate 2e-3 --seed "$seed" \
        --data-seed "$seed" --lora-dropout 0 >"$d.log" 2>&1
      "$F" analyze intruders --model $M --tuned "$d" --output "$d/analysis" >/dev/null 2>&1
      measure "$name" "$d/analysis" "$d" $M
    done
  done
  d=$R/full
  [ -e "$d/model.safetensors" ] || "$F" train --model $M --output "$d" "${TRAIN[@]}" --peft-type full \
    --learning-rate 2e-4 --seed "$seed" --data-seed "$seed" >"$d.log" 2>&1
  "$F" analyze intruders --model $M --tuned "$d" --output "$d/analysis" >/dev/null 2>&1
  measure full "$d/analysis" "" "$d"
  for lambda in 0.75 0.5 0; do
    d=$R/lora-r4-reduced-$lambda
    "$F" analyze intruders --model $M --tuned "$R/lora-r4" --output "$d" --reduce $lambda >/dev/null 2>&1
    "$F" analyze intruders --model $M --tuned "$d" --output "$d/analysis" >/dev/null 2>&1
    measure "lora-r4-reduced-$lambda" "$d/analysis" "$d" $M
  done
  echo "seed $seed done"
done
