#!/usr/bin/env bash
# DoTA in miniature (docs/results/dota.md): tensor-train adapters initialised from the weights (DoTA) against the
# same cores at random (last core zero), LoRA and QDoTA (DoTA on an NF4 base), at matched trainable-parameter
# budgets (MPO bond dimension CHI vs LoRA rank R, MPO never larger), on the quickstart task and on a harder one
# (reverse the words of a sentence, scripts/make_reverse_task.py); same steps, data order and seeds 0 1 2.
#   BUDGETS="2:4 4:6" TASKS="quickstart reverse" SEEDS="0 1 2" scripts/dota_study.sh
# Writes runs under $OUT and one summary line per run to $OUT/summary.jsonl; scripts/study_report.py makes the tables and plots.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
OUT=${OUT:-runs/dota-study}
BUDGETS=${BUDGETS:-"2:4 4:6"}
TASKS=${TASKS:-"quickstart reverse"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-150}
mkdir -p "$OUT"
COMMON=(--target-modules all-linear --lora-dropout 0 --learning-rate 2e-3 --max-steps "$STEPS" --seq-len 256
        --micro-batch-size 4 --warmup-steps 15 --eval-steps 10)
for task in $TASKS; do
  for budget in $BUDGETS; do
    r=${budget%%:*}; chi=${budget##*:}
    for method in lora dota random qdota; do
      case $method in
        lora) M=(--method lora --r "$r" --lora-alpha "$((2 * r))") ;;
        dota) M=(--method mpo --bond-dim "$chi") ;;
        random) M=(--method mpo --bond-dim "$chi" --init-weights random) ;;
        qdota) M=(--method mpo --bond-dim "$chi" --quantize nf4) ;;
      esac
      for seed in $SEEDS; do
        run="$OUT/$task-r$r-chi$chi-$method-s$seed"
        # finished runs are kept: the study can be stopped and continued
        grep -qs "\"run\":\"$run\"" "$OUT/summary.jsonl" && continue
        rm -rf "$run"
        echo "== $run" >&2
        start=$(date +%s.%N)
        "$F" train --model assets/default-model --data "assets/data/$task-train.jsonl" --output "$run" \
          "${COMMON[@]}" "${M[@]}" --seed "$seed" --data-seed "$seed" --dropout-seed "$seed" \
          > "$run.log" 2> "$run.err"
        secs=$(awk "BEGIN { print $(date +%s.%N) - $start }")
        em=$("$F" eval --model assets/default-model --adapter "$run" --data "assets/data/$task-valid.jsonl" \
          2>/dev/null | grep -o 'exact match [0-9.]*' | awk '{print $3}')
        params=$(grep -o 'trainable params: [0-9,]*' "$run.err" | head -1 | awk '{print $3}' | tr -d ,)
        echo "{\"task\":\"$task\",\"budget\":\"r$r/chi$chi\",\"method\":\"$method\",\"seed\":$seed,\"params\":$params,\"exact_match\":$em,\"seconds\":$secs,\"steps\":$STEPS,\"run\":\"$run\"}" \
          >> "$OUT/summary.jsonl"
      done
    done
  done
done
