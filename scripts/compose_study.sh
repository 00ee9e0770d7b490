#!/usr/bin/env bash
# Adapter composition on the embedded model (docs/results/composition.md). Six LoRA adapters (r = 8, every
# linear layer) are trained on six source tasks: the quickstart questions, word reversal, and copy / first word /
# drop the first word / second word (scripts/make_compose_tasks.py). On a held-out task none was trained on
# (give the last word) they are compared as: the base alone, each single adapter, their uniform average
# (A = Σ Aᵢ/6, B = Σ Bᵢ/6, LoraHub's composition at w = 1/6, written by merge-adapters --combination linear
# with weights 1/36, which factors the same product), LoraHub on 5 and 20 examples, and a LoRA trained on the
# same 5 or 20 examples, for each seed. Then ZipLoRA against the plain sum and the average of the copy and
# reversal adapters, scored on both tasks. Every result is a line of $OUT/results.jsonl.
#   SEEDS="0 1 2" scripts/compose_study.sh; python3 scripts/compose_report.py runs/compose-study
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
M=assets/default-model
OUT=${OUT:-runs/compose-study}
SEEDS=${SEEDS:-0 1 2}
STEPS=${STEPS:-1000}
D=$OUT/data
mkdir -p "$OUT"
python3 scripts/make_compose_tasks.py "$D"
cp assets/data/{quickstart,reverse}-{train,valid}.jsonl "$D/"
SOURCES=(quickstart reverse copy first drop-first second)
HELD=last
LORA=(--r 16 --lora-alpha 32 --target-modules all-linear --lora-dropout 0 --seq-len 128)

for t in "${SOURCES[@]}"; do
  [ -f "$OUT/src-$t/adapter_config.json" ] && continue
  "$F" train --model $M --data "$D/$t-train.jsonl" --output "$OUT/src-$t" "${LORA[@]}" --max-steps "$STEPS" \
    --micro-batch-size 8 --learning-rate 3e-3 --warmup-steps 30 > "$OUT/src-$t.log" 2>&1
done

# record WHAT TASK SHOTS SEED [--adapter DIR]: exact match and loss of the base (+ adapter) on TASK's validation set
record() {
  local what=$1 task=$2 shots=$3 seed=$4; shift 4
  local em loss
  em=$("$F" eval --model $M "$@" --data "$D/$task-valid.jsonl" --task exact-match --json --max-new-tokens 16 \
    2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["exact_match"])')
  loss=$("$F" eval --model $M "$@" --data "$D/$task-valid.jsonl" --task perplexity --json \
    2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["loss"])')
  echo "{\"what\":\"$what\",\"task\":\"$task\",\"shots\":$shots,\"seed\":$seed,\"exact_match\":$em,\"loss\":$loss}" \
    >> "$OUT/results.jsonl"
}
: > "$OUT/results.jsonl"

record base $HELD 0 0
for t in "${SOURCES[@]}"; do record "single-$t" $HELD 0 0 --adapter "$OUT/src-$t"; done
ALL=$(printf "$OUT/src-%s," "${SOURCES[@]}"); ALL=${ALL%,}
rm -rf "$OUT/uniform"
"$F" merge-adapters --model $M --adapters "$ALL" --weights "$(printf '%s,' 0.027777778{,,,,,} | sed 's/,$//')" \
  --combination linear --output "$OUT/uniform" > /dev/null
record uniform $HELD 0 0 --adapter "$OUT/uniform"

for seed in $SEEDS; do
  for shots in 5 20; do
    few="$D/$HELD-few$shots-s$seed.jsonl"
    python3 -c "import random,sys; r=open(sys.argv[1]).readlines(); random.Random(int(sys.argv[2])).shuffle(r); \
open(sys.argv[3],'w').writelines(r[:int(sys.argv[4])])" "$D/$HELD-train.jsonl" "$seed" "$few" "$shots"
    hub="$OUT/lorahub-$shots-s$seed"; rm -rf "$hub"
    "$F" lorahub --model $M --adapters "$ALL" --data "$few" --output "$hub" --budget 40 --seed "$seed" \
      > "$hub.log" 2>&1
    # the best objective so far, per evaluation, for `factune plot`
    python3 -c "import json,sys; j=json.load(open(sys.argv[1])); b=float('inf'); \
f=open(sys.argv[2],'w'); [f.write(json.dumps({'step': i + 1, 'best_objective': (b := min(b, e['objective']))}) + '\n') \
for i, e in enumerate(j['evaluations'])]" "$hub/lorahub.json" "$hub/metrics.jsonl"
    record "lorahub" $HELD "$shots" "$seed" --adapter "$hub"
    lora="$OUT/fewshot-lora-$shots-s$seed"; rm -rf "$lora"
    "$F" train --model $M --data "$few" --output "$lora" "${LORA[@]}" --micro-batch-size 5 --max-steps 40 \
      --learning-rate 2e-3 --warmup-steps 4 --validation-split 0 --seed "$seed" > "$lora.log" 2>&1
    record "lora-few" $HELD "$shots" "$seed" --adapter "$lora"
  done
done
"$F" plot $(for s in $SEEDS; do echo "5-shot-s$s=$OUT/lorahub-5-s$s 20-shot-s$s=$OUT/lorahub-20-s$s"; done) \
  --key best_objective --title "LoraHub: best objective over evaluations" --output "$OUT/lorahub.png"

# ZipLoRA of copy and reversal (opposite word orders) against their sum and average
head -20 "$D/copy-train.jsonl" > "$D/copy-20.jsonl"
head -20 "$D/reverse-train.jsonl" > "$D/reverse-20.jsonl"
PAIR="$OUT/src-copy,$OUT/src-reverse"
rm -rf "$OUT/zip" "$OUT/sum" "$OUT/average"
"$F" ziplora --model $M --adapters "$PAIR" --data-a "$D/copy-20.jsonl" --data-b "$D/reverse-20.jsonl" \
  --output "$OUT/zip" --steps 100 > "$OUT/zip.log" 2>&1
python3 -c "import json,sys; j=json.load(open(sys.argv[1])); f=open(sys.argv[2],'w'); \
[f.write(json.dumps(h) + '\n') for h in j['history']]" "$OUT/zip/ziplora.json" "$OUT/zip/metrics.jsonl"
"$F" plot "copy+reverse=$OUT/zip" --key difference --title "ZipLoRA: output difference over steps (copy + reverse)" \
  --output "$OUT/ziplora.png"
"$F" merge-adapters --model $M --adapters "$PAIR" --weights 1,1 --combination cat --output "$OUT/sum" > /dev/null
"$F" merge-adapters --model $M --adapters "$PAIR" --weights 0.5,0.5 --combination cat --output "$OUT/average" > /dev/null
for task in copy reverse; do
  record "alone" $task 0 0 --adapter "$OUT/src-$task"
  for m in zip sum average; do record "$m" $task 0 0 --adapter "$OUT/$m"; done
done
