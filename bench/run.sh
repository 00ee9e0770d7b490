#!/usr/bin/env bash
# Same-run comparison between factune and PyTorch + transformers + PEFT on a random-weight SmolLM2-135M-shaped
# model both read from one directory:
#   1. the f32 matmul peak at the model's shapes (candle's gemm, torch, numpy);
#   2. a LoRA training step (forward + backward + AdamW, r=16 all-linear): tokens/s, model-FLOPs utilisation
#      against the measured peak, peak RSS;
#   3. inference with a merged LoRA adapter: prefill and greedy-decode tokens/s.
#
#   PYTHON=/path/to/venv/bin/python bench/run.sh [seq_len] [batch] [steps]
#
# Needs torch, transformers and peft in $PYTHON (scripts/requirements-fixtures.txt). Not part of CI.
# EXTRA passes flags to `factune bench train` only (e.g. EXTRA=--gradient-checkpointing).
set -euo pipefail
cd "$(dirname "$0")/.."
SEQ=${1:-256}; BATCH=${2:-4}; STEPS=${3:-3}
PY=${PYTHON:-python3}
DIR=${BENCH_DIR:-target/bench/smollm2-135m}
cargo build --release -q -p factune
BIN=target/release/factune
[ -f "$DIR/model.safetensors" ] || "$BIN" bench init --output "$DIR"
FP=$("$BIN" bench peak | tail -1)
PP=$("$PY" bench/peer_peak.py | tail -1)
F=$("$BIN" bench train --model "$DIR" --seq-len "$SEQ" --batch "$BATCH" --steps "$STEPS" ${EXTRA:-} | tail -1)
P=$("$PY" bench/peer_train.py --model "$DIR" --seq-len "$SEQ" --batch "$BATCH" --steps "$STEPS" 2>/dev/null | tail -1)
FI=$("$BIN" bench infer --model "$DIR" | tail -1)
PI=$("$PY" bench/peer_infer.py --model "$DIR" 2>/dev/null | tail -1)
"$PY" - "$FP" "$PP" "$F" "$P" "$FI" "$PI" <<'PYEOF'
import json, sys, platform
fp, pp, f, p, fi, pi = (json.loads(a) for a in sys.argv[1:])
peak = fp["peak_gflops"]
print(f"machine: {platform.processor() or platform.machine()}, torch {p['torch']} with {p['threads']} threads")
print()
print("f32 matmul peak at the model's shapes, GFLOP/s (best shape):")
print(f"candle gemm (factune's path) {peak:.0f} | torch {pp['torch_peak_gflops']:.0f} | numpy {pp['numpy_peak_gflops']:.0f}")
print()
print(f"LoRA training step, SmolLM2-135M shape, seq {f['seq_len']} x batch {f['batch']}, r={f['r']}, {f['steps']} timed steps"
      + (" (gradient checkpointing)" if f.get("gradient_checkpointing") else ""))
print(f"model FLOPs per token: {f['flops_per_token'] / 1e6:.0f} M (accounting in docs/performance.md)")
print("| impl | tokens/s | s/step | model GFLOP/s | MFU vs candle-gemm peak | peak RSS (MB) |")
print("|---|---|---|---|---|---|")
for r in (f, p):
    g = f["flops_per_token"] * r["tokens_per_s"] / 1e9
    print(f"| {r['impl']} | {r['tokens_per_s']:.1f} | {r['seconds_per_step']:.2f} | {g:.0f} | {g / peak:.0%} | {r['peak_rss_mb']:.0f} |")
print(f"ratio factune/pytorch: tokens/s {f['tokens_per_s'] / p['tokens_per_s']:.2f}x, "
      f"peak RSS {f['peak_rss_mb'] / p['peak_rss_mb']:.2f}x")
print()
print(f"Inference with a merged LoRA (r={fi['r']}), batch {fi['batch']}, prompt {fi['prompt_len']}, {fi['new_tokens']} new tokens (greedy)")
print("| impl | prefill tokens/s | decode tokens/s | peak RSS (MB) |")
print("|---|---|---|---|")
for r in (fi, pi):
    print(f"| {r['impl']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
print(f"ratio factune/pytorch: prefill {fi['prefill_tokens_per_s'] / pi['prefill_tokens_per_s']:.2f}x, "
      f"decode {fi['decode_tokens_per_s'] / pi['decode_tokens_per_s']:.2f}x")
PYEOF
