#!/usr/bin/env python3
"""Tables and the intruder sweep plot of the LoRA-vs-full study (scripts/lora_vs_full_study.sh): per run, the
task's exact match, pre-training perplexity, and intruder dimensions (top 10, ε = 0.5) as mean ± std over
seeds; the ε sweep of every run as a PNG (needs matplotlib).

    python3 scripts/lora_vs_full_report.py runs/lora-vs-full [docs/results/lora-vs-full-sweep.png]
"""
import json
import statistics
import sys
from collections import defaultdict

out = sys.argv[1]
png = sys.argv[2] if len(sys.argv) > 2 else f"{out}/intruders-sweep.png"
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
by = defaultdict(list)
for r in rows:
    by[r["run"]].append(r)
order = ["base"] + [f"lora-r{r}" for r in (1, 4, 16, 64)] + [f"rslora-r{r}" for r in (1, 4, 16, 64)]
order += ["full"] + [f"lora-r4-reduced-{l}" for l in ("0.75", "0.5", "0")]


def ms(xs, fmt="{:.3f}"):
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (fmt + " ± " + fmt).format(statistics.mean(xs), statistics.stdev(xs))


print(f"{len(by['base'])} seed(s)\n")
print("| run | exact match | pre-training perplexity | intruders (top 10, ε 0.5) | layers with intruders (of 28) |")
print("|---|---|---|---|---|")
for name in order:
    rs = by.get(name, [])
    if not rs:
        continue
    em = ms([r["exact_match"]["exact_match"] for r in rs])
    ppl = ms([r["pretrain"]["perplexity"] for r in rs], "{:.2f}")
    intr = ms([r["intruders"]["intruders"] for r in rs if "intruders" in r], "{:.1f}")
    lay = ms([r["intruders"]["layers_with_intruders"] for r in rs if "intruders" in r], "{:.1f}")
    print(f"| {name} | {em} | {ppl} | {intr} | {lay} |")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("matplotlib is not installed: tables only")
fig, ax = plt.subplots(figsize=(9, 5.4))
for name in order:
    rs = [r for r in by.get(name, []) if "intruders" in r]
    if not rs or "reduced" in name:
        continue
    eps = [p["epsilon"] for p in rs[0]["intruders"]["sweep"]]
    mean = [statistics.mean(r["intruders"]["sweep"][i]["intruders"] for r in rs) for i in range(len(eps))]
    ax.plot(eps, mean, marker="o", ms=3, label=name, ls="--" if name.startswith("rs") else "-")
ax.set_xlabel("ε (cosine threshold)")
ax.set_ylabel("intruder dimensions, all 28 layers (mean over seeds)")
ax.set_title("Intruder dimensions of the quickstart fine-tunes against ε")
ax.set_yscale("symlog")
ax.legend()
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(png, dpi=110)
print(f"\n{png}")
