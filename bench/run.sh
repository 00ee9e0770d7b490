#!/usr/bin/env bash
# Same-run comparison of one LoRA training step (forward + backward + AdamW, r=16 all-linear) between factune
# and PyTorch + transformers + PEFT, on a random-weight SmolLM2-135M-shaped model both read from one directory.
#
#   PYTHON=/path/to/venv/bin/python bench/run.sh [seq_len] [batch] [steps]
#
# Needs torch, transformers and peft in $PYTHON (scripts/requirements-fixtures.txt). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ=${1:-256}; BATCH=${2:-4}; STEPS=${3:-3}
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench/smollm2-135m}
cargo build --release -q -p factune
BIN=target/release/factune
[ -f "$DIR/model.safetensors" ] || "$BIN" bench init --output "$DIR"
F=$("$BIN" bench train --model "$DIR" --seq-len "$SEQ" --batch "$BATCH" --steps "$STEPS" | tail -1)
P=$("$PY" bench/peer_train.py --model "$DIR" --seq-len "$SEQ" --batch "$BATCH" --steps "$STEPS" 2>/dev/null | tail -1)
"$PY" - "$F" "$P" <<'PYEOF'
import json, sys, platform
f, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"LoRA training step, SmolLM2-135M shape, seq {f['seq_len']} x batch {f['batch']}, r={f['r']}, {f['steps']} timed steps")
print(f"machine: {platform.processor() or platform.machine()}, torch {p['torch']} with {p['threads']} threads")
print("| impl | tokens/s | s/step | peak RSS (MB) |")
print("|---|---|---|---|")
for r in (f, p):
    print(f"| {r['impl']} | {r['tokens_per_s']:.1f} | {r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} |")
print(f"ratio factune/pytorch: tokens/s {f['tokens_per_s'] / p['tokens_per_s']:.2f}x, "
      f"peak RSS {f['peak_rss_mb'] / p['peak_rss_mb']:.2f}x")
PYEOF
