#!/usr/bin/env python3
"""Tables of docs/results/composition.md from a compose study's results.jsonl (scripts/compose_study.sh):
mean ± sample standard deviation over seeds where a row has several.

    python3 scripts/compose_report.py runs/compose-study
"""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(f"{sys.argv[1]}/results.jsonl")]


def stat(xs):
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(title, keep, label):
    groups = defaultdict(list)
    for r in rows:
        if keep(r):
            groups[label(r)].append(r)
    print(f"\n### {title}\n")
    print("| | seeds | exact match | validation loss |")
    print("|---|---|---|---|")
    for name, rs in groups.items():
        print(f"| {name} | {len(rs)} | {stat([r['exact_match'] for r in rs])} | {stat([r['loss'] for r in rs])} |")


table("Held-out task: give the last word", lambda r: r["task"] == "last",
      lambda r: r["what"] + (f" ({r['shots']}-shot)" if r["shots"] else ""))
for task in ["copy", "reverse"]:
    table(f"ZipLoRA of copy and reverse, scored on {task}", lambda r, t=task: r["task"] == t, lambda r: r["what"])
