#!/usr/bin/env bash
# Multi-task instruction tuning in miniature (Xin et al. 2024, "Beyond full fine-tuning"; the last section of
# docs/results/lora-vs-full.md): the embedded model trained on a shuffled mix of seven generated word tasks
# (scripts/make_compose_tasks.py; 250 records each, three passes, micro-batch 8, 30 warm-up steps) by LoRA on
# every linear layer at r = 1, 4, 16, 64 (lora_alpha = 2r, lr 2e-3) and by full fine-tuning (lr 2e-4), then
# scored on the 100 validation records of each seen task and of four unseen ones (their instructions never
# trained on): exact match of the greedy answer and next-token accuracy of the answer tokens.
#
#   bash scripts/multitask_study.sh [OUT] [SEEDS]     # default runs/multitask, "1 2"; then
#   python3 scripts/multitask_report.py OUT           # prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FACTUNE:-target/release/factune}
OUT=${1:-runs/multitask}
SEEDS=${2:-1 2}
M=assets/default-model
D=$OUT/data
SEEN=(copy first last drop-first reverse-words count swap)
UNSEEN=(second third drop-last first-last)
mkdir -p "$D"
python3 scripts/make_compose_tasks.py "$D" >/dev/null
python3 - "$D" "${SEEN[@]}" <<'PY'
import random, sys
d, tasks = sys.argv[1], sys.argv[2:]
rows = [l for t in tasks for l in open(f"{d}/{t}-train.jsonl").read().splitlines()[:250]]
random.Random(0).shuffle(rows)
open(f"{d}/mix-train.jsonl", "w").write("\n".join(rows) + "\n")
PY
COMMON=(--data "$D/mix-train.jsonl" --num-train-epochs 3 --micro-batch-size 8 --warmup-steps 30
        --validation-split 0)
for seed in $SEEDS; do
  for cfg in lora-r1 lora-r4 lora-r16 lora-r64 full; do
    run=$OUT/$cfg-s$seed
    grep -qs "\"run\":\"$run\"" "$OUT/results.jsonl" && continue
    echo "== $run" >&2
    case $cfg in
      full) flags=(--peft-type full --learning-rate 2e-4) ;;
      *) r=${cfg#lora-r}
         flags=(--r "$r" --lora-alpha $((2 * r)) --target-modules all-linear --lora-dropout 0 --learning-rate 2e-3) ;;
    esac
    rm -rf "$run"
    "$F" train --model $M --output "$run" "${COMMON[@]}" "${flags[@]}" \
      --seed "$seed" --data-seed "$seed" >"$run.log" 2>"$run.err"
    target=(--model $M --adapter "$run")
    [ "$cfg" = full ] && target=(--model "$run")
    lines=""
    for t in "${SEEN[@]}" "${UNSEEN[@]}"; do
      seen=false
      [[ " ${SEEN[*]} " == *" $t "* ]] && seen=true
      em=$("$F" eval "${target[@]}" --data "$D/$t-valid.jsonl" 2>/dev/null | awk '/exact match/ {print $3}')
      acc=$("$F" eval "${target[@]}" --data "$D/$t-valid.jsonl" --task perplexity 2>/dev/null \
        | awk '/next-token accuracy/ {print $NF}')
      lines+="{\"run\":\"$run\",\"config\":\"$cfg\",\"seed\":$seed,\"task\":\"$t\",\"seen\":$seen,\"exact_match\":$em,\"accuracy\":$acc}"$'\n'
    done
    printf '%s' "$lines" >>"$OUT/results.jsonl"
  done
done
