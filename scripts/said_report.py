#!/usr/bin/env python3
"""Tables and plot of the SAID study (scripts/said_study.sh): for each model and task, held-out next-token
accuracy at every intrinsic dimension d (mean ± std over seeds), the full fine-tune's and the base's, and each
seed's d90. Prints markdown; writes docs/results/said.png (needs matplotlib).

    python3 scripts/said_report.py runs/said
"""
import glob
import json
import os
import statistics
import sys

out = sys.argv[1]
MODELS = {"default-model": "embedded model (1,000 pre-training steps)", "model-250": "250 pre-training steps"}
TASKS = ["quickstart", "reverse"]


def ms(xs):
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


curves = {}
for model in MODELS:
    for task in TASKS:
        docs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, f"{model}-{task}-s*", "said.json")))]
        if not docs:
            continue
        dims = [r["intrinsic_dimension"] for r in docs[0]["runs"]]
        acc = {d: [doc["runs"][i]["accuracy"] for doc in docs] for i, d in enumerate(dims)}
        full = [doc["full"]["accuracy"] for doc in docs]
        base = [doc["base"]["accuracy"] for doc in docs]
        d90 = [doc["d90"] for doc in docs]
        curves[(model, task)] = (dims, acc, full)
        print(f"\n### {task}, {MODELS[model]} ({len(docs)} seeds)\n")
        print(f"base {ms(base)}, full fine-tune {ms(full)}, threshold (90%) {ms([0.9 * f for f in full])}; "
              f"d90 per seed: {', '.join(str(d) if d is not None else 'not reached' for d in d90)}\n")
        print("| d | " + " | ".join(str(d) for d in dims) + " |")
        print("|---|" + "---|" * len(dims))
        print("| accuracy | " + " | ".join(ms(acc[d]) for d in dims) + " |")
        print("| share of full | " + " | ".join(
            ms([a / f for a, f in zip(acc[d], full)]) for d in dims) + " |")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4.2), sharey=False)
for ax, task in zip(axes, TASKS):
    for model, style in zip(MODELS, ["-o", "--s"]):
        if (model, task) not in curves:
            continue
        dims, acc, full = curves[(model, task)]
        share = [statistics.mean(a / f for a, f in zip(acc[d], full)) for d in dims]
        ax.plot(dims, share, style, label=MODELS[model])
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_title(task)
    ax.set_xlabel("intrinsic dimension d")
    ax.set_ylabel("accuracy / full fine-tune's")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("docs/results/said.png", dpi=110)
