#!/usr/bin/env bash
# Continual learning on a stream of four embedded tasks (docs/results/continual.md): the quickstart questions,
# then give the first word, drop the first word, give the last word (scripts/make_compose_tasks.py), 400
# records each, seen once in that order. Five ways to learn them, scored on the same held-out records of
# every task (10% of each segment, as the Online-LoRA runs hold them out; listed in their stream.json):
#   online      Online-LoRA (peft_type = online_lora): plateaus, hard buffer, penalty (mas_weight 2000)
#   online-w100 the same with mas_weight 100
#   seq-lora    one LoRA trained on the stream in order: no plateau, no buffer, no penalty
#   seq-full    full fine-tuning, one task after another (each stage starts from the last)
#   per-task    one LoRA per task from the base (each task scored with its own adapter: an upper bound)
#   joint       one LoRA on all four tasks shuffled together (multi-task, no stream)
# LoRA: r = 4 on every linear layer, lr 2e-3; full: lr 1e-4; micro-batch 4, one pass. Every score is
# held-out loss and next-token accuracy (factune eval --task perplexity); forgetting is the mean over the
# first three tasks of (best accuracy after the task was learned − final accuracy).
#
#   bash scripts/continual_study.sh [OUT] [SEEDS]     # default runs/continual, "1 2 3"; then
#   python3 scripts/continual_report.py OUT           # writes docs/results/continual.md
set -euo pipefail
cd "$(dirname "$0")/.."
F=${FACTUNE:-target/release/factune}
OUT=${1:-runs/continual}
SEEDS=${2:-1 2 3}
M=assets/default-model
D=$OUT/data
N=400
TASKS=(quickstart first drop-first last)
mkdir -p "$D"
python3 scripts/make_compose_tasks.py "$D" >/dev/null
for t in "${TASKS[@]}"; do
  src=$D/$t-train.jsonl
  [ "$t" = quickstart ] && src=assets/data/quickstart-train.jsonl
  head -n $N "$src" >"$D/s-$t.jsonl"
done
REST="$D/s-first.jsonl,$D/s-drop-first.jsonl,$D/s-last.jsonl"
LORA=(--r 4 --target-modules all-linear --learning-rate 2e-3 --micro-batch-size 4)
ONLINE=(--method online_lora --data "$D/s-quickstart.jsonl" --stream-data "$REST"
        --loss-window-variance-threshold 0.05)

score() { # model adapter-or-"" held-file → one JSON line
  local a=()
  [ -n "$2" ] && a=(--adapter "$2")
  "$F" eval --model "$1" "${a[@]}" --data "$3" --task perplexity --json 2>/dev/null
}

for seed in $SEEDS; do
  R=$OUT/seed$seed
  mkdir -p "$R"
  for cfg in online online-w100 seq-lora; do
    extra=(--loss-window-mean-threshold 1.0)
    [ $cfg = online-w100 ] && extra+=(--mas-weight 100)
    [ $cfg = seq-lora ] && extra=(--hard-buffer-size 0 --mas-weight 0 --loss-window-mean-threshold 0)
    [ -e "$R/$cfg/stream.json" ] || "$F" train --model $M --output "$R/$cfg" "${ONLINE[@]}" "${LORA[@]}" \
      --seed "$seed" --data-seed "$seed" "${extra[@]}" >"$R/$cfg.log" 2>&1
  done
  # the held-out records of each task (as the online runs held them out) and the rest, in order
  python3 - "$R/online/stream.json" "$D" "$R" "${TASKS[@]}" <<'EOF'
import json, sys
stream, data, out, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
held = json.load(open(stream))["held_out_examples"]
for t, h in zip(tasks, held):
    lines = open(f"{data}/s-{t}.jsonl").read().splitlines()
    h = set(h)
    open(f"{out}/held-{t}.jsonl", "w").write("".join(l + "\n" for i, l in enumerate(lines) if i in h))
    open(f"{out}/rest-{t}.jsonl", "w").write("".join(l + "\n" for i, l in enumerate(lines) if i not in h))
EOF
  : >"$R/scores.jsonl"
  # sequential full fine-tuning: each stage from the last stage's model, scored on every task after it
  base=$M
  for k in "${!TASKS[@]}"; do
    t=${TASKS[$k]}
    [ -e "$R/full-$k/model.safetensors" ] || "$F" train --model "$base" --data "$R/rest-$t.jsonl" \
      --eval-data "$R/held-$t.jsonl" --output "$R/full-$k" --peft-type full --learning-rate 1e-4 \
      --micro-batch-size 4 --num-train-epochs 1 --seed "$seed" --data-seed "$seed" >"$R/full-$k.log" 2>&1
    base=$R/full-$k
    for u in "${TASKS[@]}"; do
      echo "{\"config\":\"seq-full\",\"after\":$k,\"task\":\"$u\",\"score\":$(score "$base" "" "$R/held-$u.jsonl")}" >>"$R/scores.jsonl"
    done
  done
  # one LoRA per task, and one on all tasks together
  for t in "${TASKS[@]}"; do
    [ -e "$R/task-$t/adapter_model.safetensors" ] || "$F" train --model $M --data "$R/rest-$t.jsonl" \
      --eval-data "$R/held-$t.jsonl" --output "$R/task-$t" "${LORA[@]}" --num-train-epochs 1 \
      --seed "$seed" --data-seed "$seed" >"$R/task-$t.log" 2>&1
    echo "{\"config\":\"per-task\",\"after\":3,\"task\":\"$t\",\"score\":$(score $M "$R/task-$t" "$R/held-$t.jsonl")}" >>"$R/scores.jsonl"
  done
  cat "$R"/rest-*.jsonl >"$R/joint.jsonl"
  cat "$R"/held-*.jsonl >"$R/joint-held.jsonl"
  [ -e "$R/joint/adapter_model.safetensors" ] || "$F" train --model $M --data "$R/joint.jsonl" \
    --eval-data "$R/joint-held.jsonl" --output "$R/joint" "${LORA[@]}" --num-train-epochs 1 \
    --seed "$seed" --data-seed "$seed" >"$R/joint.log" 2>&1
  for t in "${TASKS[@]}"; do
    echo "{\"config\":\"joint\",\"after\":3,\"task\":\"$t\",\"score\":$(score $M "$R/joint" "$R/held-$t.jsonl")}" >>"$R/scores.jsonl"
  done
  # the stream runs' final adapters through eval too (their in-run matrix is in stream.json)
  for cfg in online online-w100 seq-lora; do
    for t in "${TASKS[@]}"; do
      echo "{\"config\":\"$cfg\",\"after\":3,\"task\":\"$t\",\"score\":$(score $M "$R/$cfg" "$R/held-$t.jsonl")}" >>"$R/scores.jsonl"
    done
  done
  echo "seed $seed done: $R"
done
