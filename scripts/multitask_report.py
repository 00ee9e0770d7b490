#!/usr/bin/env python3
"""Tables of the multi-task study (scripts/multitask_study.sh): per configuration, exact match and next-token
accuracy averaged over the seen tasks and over the unseen ones, and per unseen task; mean ± std over seeds.

    python3 scripts/multitask_report.py runs/multitask
"""
import json
import statistics
import sys

rows = [json.loads(l) for l in open(f"{sys.argv[1]}/results.jsonl")]
CONFIGS = ["lora-r1", "lora-r4", "lora-r16", "lora-r64", "full"]


def ms(xs):
    return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def per_seed(cfg, key, pick):
    seeds = sorted({r["seed"] for r in rows if r["config"] == cfg})
    out = []
    for s in seeds:
        xs = [r[key] for r in rows if r["config"] == cfg and r["seed"] == s and pick(r)]
        out.append(sum(xs) / len(xs))
    return out


unseen = sorted({r["task"] for r in rows if not r["seen"]})
print("| run | seeds | seen: exact match | seen: accuracy | unseen: exact match | unseen: accuracy |")
print("|---|---|---|---|---|---|")
for c in CONFIGS:
    if not any(r["config"] == c for r in rows):
        continue
    n = len({r["seed"] for r in rows if r["config"] == c})
    cells = [ms(per_seed(c, k, lambda r, s=s: r["seen"] == s)) for s in (True, False) for k in ("exact_match", "accuracy")]
    print(f"| {c} | {n} | " + " | ".join(cells) + " |")
print()
print("| run | " + " | ".join(f"{t}: accuracy" for t in unseen) + " |")
print("|---|" + "---|" * len(unseen))
for c in CONFIGS:
    if any(r["config"] == c for r in rows):
        print(f"| {c} | " + " | ".join(ms(per_seed(c, "accuracy", lambda r, t=t: r["task"] == t)) for t in unseen) + " |")
print()
seen = [t for t in dict.fromkeys(r["task"] for r in rows if r["seen"])]
print("| run | " + " | ".join(f"{t}: exact match" for t in seen) + " |")
print("|---|" + "---|" * len(seen))
for c in CONFIGS:
    if any(r["config"] == c for r in rows):
        print(f"| {c} | " + " | ".join(ms(per_seed(c, "exact_match", lambda r, t=t: r["task"] == t)) for t in seen) + " |")
