# Shared by the study scripts: one training run plus its evaluation, recorded as a line of $OUT/summary.jsonl
# (read by scripts/study_report.py). A run already recorded is skipped, so a study can be stopped and continued.
#   study_run TASK BUDGET METHOD SEED -- TRAIN_FLAGS...
# Needs F (the factune binary), OUT, STEPS and COMMON (flags shared by every run) set by the caller.
study_run() {
  local task=$1 budget=$2 method=$3 seed=$4; shift 5
  local run="$OUT/$task-${budget//\//-}-$method-s$seed"
  grep -qs "\"run\":\"$run\"" "$OUT/summary.jsonl" && return 0
  rm -rf "$run"
  echo "== $run" >&2
  local start secs em params
  start=$(date +%s.%N)
  "$F" train --model assets/default-model --data "assets/data/$task-train.jsonl" --output "$run" \
    "${COMMON[@]}" "$@" --seed "$seed" --data-seed "$seed" --dropout-seed "$seed" > "$run.log" 2> "$run.err"
  secs=$(awk "BEGIN { print $(date +%s.%N) - $start }")
  em=$("$F" eval --model assets/default-model --adapter "$run" --data "assets/data/$task-valid.jsonl" \
    2>/dev/null | grep -o 'exact match [0-9.]*' | awk '{print $3}')
  params=$(grep -o 'trainable params: [0-9,]*' "$run.err" | head -1 | awk '{print $3}' | tr -d ,)
  echo "{\"task\":\"$task\",\"budget\":\"$budget\",\"method\":\"$method\",\"seed\":$seed,\"params\":$params,\"exact_match\":$em,\"seconds\":$secs,\"steps\":$STEPS,\"run\":\"$run\"}" \
    >> "$OUT/summary.jsonl"
}
