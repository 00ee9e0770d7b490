#!/usr/bin/env bash
# ReLoRA in miniature (docs/results/relora.md): pre-train the embedded default architecture from scratch on the
# shipped corpus four ways with the same tokens, seeds and schedule — full-rank, LoRA, LoRA after a full-rank
# warm start, ReLoRA (same warm start) — then fine-tune the default model on the quickstart task with LoRA and
# ReLoRA. Prints one table; curves go to docs/results/. Takes ~35 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p factune
F=target/release/factune
OUT=${OUT:-runs/relora-study}
mkdir -p "$OUT" docs/results
STEPS=${STEPS:-1000}

# Adapters: all linear layers, rank R (default 8 = hidden/24; R=32 = hidden/6 is ReLoRA's own ratio, r = 128
# for hidden 768), scale 1; embeddings and norms train in every run, as in the ReLoRA paper.
# RUNS picks the pre-training runs to (re)do; FINETUNE=0 skips the fine-tuning part.
R=${R:-8}
RUNS=${RUNS:-full lora lora-warm relora}
ADAPT=(--peft-type LORA --target-modules all-linear --r "$R" --lora-alpha "$R" --lora-dropout 0
       --train-embeddings-and-norms true)
WARM=(--warm-start-steps 200)
RELORA=(--relora-steps 200 --restart-warmup-steps 20 --optimizer-prune-ratio 0.99)

pretrain() {
  local name=$1; shift
  echo "== pretrain $name" >&2
  /usr/bin/time -f "%e s wall, %M KB peak RSS" -o "$OUT/$name.time" \
    "$F" pretrain --config assets/pretrain.toml --data assets/data/pretrain.txt --output "$OUT/$name" \
    --max-steps "$STEPS" --eval-steps 50 "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
}
for run in $RUNS; do
  case $run in
    full) pretrain full ;;
    lora) pretrain lora "${ADAPT[@]}" ;;
    lora-warm) pretrain lora-warm "${ADAPT[@]}" "${WARM[@]}" ;;
    relora) pretrain relora "${ADAPT[@]}" "${WARM[@]}" "${RELORA[@]}" ;;
  esac
done
"$F" plot full="$OUT/full" lora="$OUT/lora" lora+warm-start="$OUT/lora-warm" relora="$OUT/relora" \
  --key val_loss --exp --title "pre-training from scratch (r = $R): validation perplexity" \
  --output "docs/results/relora-pretrain-r$R.png"

# Fine-tuning: the quickstart recipe (r 16, all-linear, 150 steps) with and without restarts every 50 steps.
FT=(--target-modules all-linear --lora-dropout 0 --r 16 --lora-alpha 32 --learning-rate 2e-3 --max-steps 150
    --seq-len 256 --micro-batch-size 8 --warmup-steps 15 --eval-steps 10 --seed 0 --data-seed 0)
finetune() {
  local name=$1; shift
  echo "== finetune $name" >&2
  /usr/bin/time -f "%e s wall, %M KB peak RSS" -o "$OUT/$name.time" \
    "$F" train --model assets/default-model --data assets/data/quickstart-train.jsonl --output "$OUT/$name" \
    "${FT[@]}" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
}
if [ "${FINETUNE:-1}" = 1 ]; then
finetune ft-lora
finetune ft-relora --relora-steps 50 --restart-warmup-steps 5
for n in ft-lora ft-relora; do
  if [ -f "$OUT/$n/adapter_config.json" ]; then a=(--adapter "$OUT/$n"); m=assets/default-model; else a=(); m="$OUT/$n"; fi
  "$F" eval --model "$m" "${a[@]}" --data assets/data/quickstart-valid.jsonl --json > "$OUT/$n.eval.json"
done
"$F" plot lora="$OUT/ft-lora" relora="$OUT/ft-relora" --key val_loss \
  --title "fine-tuning on the quickstart task: validation loss" --output docs/results/relora-finetune.png
fi

python3 - "$OUT" "$R" <<'PY'
import json, math, re, sys, pathlib
out = pathlib.Path(sys.argv[1])
def last(name, key):
    vals = [json.loads(l)[key] for l in open(out/name/"metrics.jsonl") if f'"{key}"' in l]
    return vals[-1]
def params(name):
    m = re.search(r"trainable params: ([\d,]+)", open(out/f"{name}.err").read().split("warm start over")[-1])
    return m.group(1)
def cost(name):
    t = open(out/f"{name}.time").read().split()
    return float(t[0]), int(t[3]) / 1024
def rank(name):
    p = out/name/"update_spectrum.json"
    if not p.exists(): return "-"
    ms = json.load(open(p))["modules"]
    rs = sorted(m["rank"] for m in ms if m["module"].endswith(("q_proj", "gate_proj", "up_proj", "down_proj", "o_proj")))
    return f"{rs[0]}–{rs[-1]}"
print(f"| pre-training run (r = {sys.argv[2]}) | trainable params (adapter phase) | final val perplexity | update rank (square/MLP layers) | wall-clock s | peak RSS MB |")
print("|---|---|---|---|---|---|")
for n in ["full", "lora", "lora-warm", "relora"]:
    s, rss = cost(n)
    print(f"| {n} | {params(n)} | {math.exp(last(n, 'val_loss')):.3f} | {rank(n)} | {s:.0f} | {rss:.0f} |")
print()
print("| fine-tuning run | trainable params | final val loss | exact match | wall-clock s | peak RSS MB |")
print("|---|---|---|---|---|---|")
for n in ["ft-lora", "ft-relora"] if (out/"ft-relora.eval.json").exists() else []:
    s, rss = cost(n)
    em = json.load(open(out/f"{n}.eval.json"))["exact_match"]
    print(f"| {n} | {params(n)} | {last(n, 'val_loss'):.4f} | {100*em:.1f}% | {s:.0f} | {rss:.0f} |")
PY
