#!/usr/bin/env python3
"""Turns a study's summary.jsonl (scripts/dota_study.sh, scripts/methods_study.sh: one line per run with task,
budget, method, seed, params, exact_match, seconds, steps, run) into markdown tables — per task and budget, each
method's trainable parameters, final validation loss and exact match (mean ± std over seeds when there are
several) and seconds per step — printed to stdout, plus one PNG of validation-loss curves (first seed) per task
and budget, written with `factune plot` as docs/results/<prefix>-<task>-<budget>.png. Standard library only.

    python3 scripts/study_report.py runs/dota-study dota
"""
import json
import os
import statistics
import subprocess
import sys

root = os.path.join(os.path.dirname(__file__), "..")
study, prefix = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(os.path.join(study, "summary.jsonl"))]
NAMES = {"lora": "LoRA", "dota": "DoTA (MPO from W)", "random": "random-init MPO", "qdota": "QDoTA (DoTA, NF4 base)",
         "rslora": "rsLoRA", "loraplus": "LoRA+ (ratio 16)", "dora": "DoRA", "pissa": "PiSSA (niter 4)",
         "vera": "VeRA", "rosa": "sparse + low-rank", "multilora": "MultiLoRA (2 branches)", "glora": "GLoRA",
         "mpo": "DoTA (MPO from W)", "adalora": "AdaLoRA (pruned to r)", "eva": "EVA (rho 2)",
         "lora-r2": "LoRA r = 2", "prompt": "prompt tuning (random)", "prompt-text": "prompt tuning (text init)",
         "ptuning": "P-tuning (MLP)", "prefix": "prefix tuning", "prefix-proj": "prefix tuning (projection)"}


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

out = []
for (task, budget), methods in groups.items():
    seeds = max(len(v) for v in methods.values())
    out.append(f"### {task}, budget {budget} ({seeds} seed{'s' if seeds > 1 else ''})\n")
    out.append("| method | trainable params | final val loss | exact match | s/step |")
    out.append("|---|---|---|---|---|")
    for m, rs in methods.items():
        out.append(
            f"| {NAMES.get(m, m)} | {rs[0]['params']:,} | {ms([r['val_loss'] for r in rs], '{:.4f}')} | "
            f"{ms([r['exact_match'] for r in rs], '{:.2f}')} | "
            f"{statistics.mean(r['seconds'] / r['steps'] for r in rs):.2f} |"
        )
    png = f"{prefix}-{task}-{budget.replace('/', '-')}.png"
    curves = [f"{NAMES.get(m, m)}={rs[0]['run']}" for m, rs in methods.items()]
    subprocess.run([os.path.join(root, "target", "release", "factune"), "plot", *curves, "--key", "val_loss",
                    "--title", f"{task}, {budget}: validation loss (seed {methods[next(iter(methods))][0]['seed']})",
                    "--output", os.path.join(root, "docs", "results", png)], check=True, cwd=root,
                   stdout=subprocess.DEVNULL)
    out.append(f"\n![validation loss, {task}, {budget}]({png})\n")
print("\n".join(out))
