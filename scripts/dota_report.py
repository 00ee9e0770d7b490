#!/usr/bin/env python3
"""Turns runs/dota-study/summary.jsonl (scripts/dota_study.sh) into docs/results/dota.md: per task and budget,
each method's trainable parameters, final validation loss and exact match as mean ± std over seeds, and
seconds per step; plus one PNG of validation-loss curves (seed 0) per task and budget via `factune plot`.
Standard library only.

    python3 scripts/dota_report.py [runs/dota-study]
"""
import json
import os
import statistics
import subprocess
import sys

root = os.path.join(os.path.dirname(__file__), "..")
study = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "runs", "dota-study")
rows = [json.loads(l) for l in open(os.path.join(study, "summary.jsonl"))]


def final_val(run):
    vals = [json.loads(l)["val_loss"] for l in open(os.path.join(root, run, "metrics.jsonl")) if "val_loss" in l]
    return vals[-1]


def ms(xs, fmt):
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (fmt + " ± " + fmt).format(statistics.mean(xs), statistics.stdev(xs))


groups = {}
for r in rows:
    r["val_loss"] = final_val(r["run"])
    groups.setdefault((r["task"], r["budget"]), {}).setdefault(r["method"], []).append(r)

names = {"lora": "LoRA", "dota": "DoTA (MPO from W)", "random": "random-init MPO", "qdota": "QDoTA (DoTA, NF4 base)"}
out = []
for (task, budget), methods in groups.items():
    seeds = max(len(v) for v in methods.values())
    out.append(f"### {task}, budget {budget} ({seeds} seeds)\n")
    out.append("| method | trainable params | final val loss | exact match | s/step |")
    out.append("|---|---|---|---|---|")
    for m in ["lora", "dota", "random", "qdota"]:
        rs = methods.get(m)
        if not rs:
            continue
        out.append(
            f"| {names[m]} | {rs[0]['params']:,} | {ms([r['val_loss'] for r in rs], '{:.4f}')} | "
            f"{ms([r['exact_match'] for r in rs], '{:.2f}')} | "
            f"{statistics.mean(r['seconds'] / r['steps'] for r in rs):.2f} |"
        )
    png = f"dota-{task}-{budget.replace('/', '-')}.png"
    curves = [f"{names[m]}={methods[m][0]['run']}" for m in ["lora", "dota", "random", "qdota"] if m in methods]
    subprocess.run([os.path.join(root, "target", "release", "factune"), "plot", *curves, "--key", "val_loss",
                    "--title", f"{task}, {budget}: validation loss (seed 0)",
                    "--output", os.path.join(root, "docs", "results", png)], check=True, cwd=root)
    out.append(f"\n![validation loss, {task}, {budget}]({png})\n")
print("\n".join(out))
