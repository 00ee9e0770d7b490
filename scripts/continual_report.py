#!/usr/bin/env python3
"""Tables of the continual-learning study (scripts/continual_study.sh): per configuration, the final held-out
next-token accuracy of each task, their average, forgetting and the average loss, as mean ± std over seeds.
The stream runs' matrices come from their stream.json (scored in the run as the stream passed each task's
end); their final row is checked against `factune eval` of the saved adapter on the same records.

    python3 scripts/continual_report.py runs/continual     # prints the markdown tables
"""
import glob
import json
import os
import statistics
import sys

TASKS = ["quickstart", "first", "drop-first", "last"]
CONFIGS = ["online", "online-w100", "seq-lora", "seq-full", "per-task", "joint"]
out = sys.argv[1]


def summary(matrix):
    """matrix[k][i]: accuracy of task i after task k (None where not measured); rows in stream order."""
    final = matrix[-1]
    avg = sum(final) / len(final)
    forget = None
    if len(matrix) > 1:
        per = [max(matrix[k][i] for k in range(i, len(matrix) - 1)) - final[i] for i in range(len(final) - 1)]
        forget = sum(per) / len(per)
    return final, avg, forget


rows = {c: [] for c in CONFIGS}
checks = []
COMPLETE = 4 * 4 + 4 + 4 + 3 * 4  # seq-full after each task; per-task; joint; the stream adapters' finals
for seed_dir in sorted(glob.glob(os.path.join(out, "seed*"))):
    path = os.path.join(seed_dir, "scores.jsonl")
    if not os.path.exists(path) or sum(1 for _ in open(path)) < COMPLETE:
        print(f"{seed_dir}: incomplete, left out")
        continue
    scores = [json.loads(l) for l in open(path)]
    by = {}
    for s in scores:
        by.setdefault(s["config"], {}).setdefault(s["after"], {})[s["task"]] = s["score"]
    for c in ["online", "online-w100", "seq-lora"]:
        st = json.load(open(os.path.join(seed_dir, c, "stream.json")))
        acc = [r["accuracy"] for r in st["matrix"]]
        loss = st["matrix"][-1]["loss"]
        final, avg, forget = summary(acc)
        ev = by[c][3]
        checks.append(max(abs(ev[t]["token_accuracy"] - final[i]) for i, t in enumerate(TASKS)))
        plateaus = sum(1 for l in open(os.path.join(seed_dir, c, "metrics.jsonl")) if "online_plateau" in l)
        rows[c].append((final, avg, forget, sum(loss) / len(loss), plateaus))
    full = [[by["seq-full"][k][t]["token_accuracy"] for t in TASKS] for k in range(4)]
    final, avg, forget = summary(full)
    loss = [by["seq-full"][3][t]["loss"] for t in TASKS]
    rows["seq-full"].append((final, avg, forget, sum(loss) / len(loss), None))
    for c in ["per-task", "joint"]:
        final = [by[c][3][t]["token_accuracy"] for t in TASKS]
        loss = [by[c][3][t]["loss"] for t in TASKS]
        rows[c].append((final, sum(final) / 4, None, sum(loss) / 4, None))


def ms(xs, fmt="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (fmt + " ± " + fmt).format(statistics.mean(xs), statistics.stdev(xs))


n = len(rows["online"])
print(f"{n} seed(s); eval of the saved stream adapters vs the in-run final scores: max |Δ accuracy| {max(checks):.2e}\n")
print("| configuration | average accuracy | forgetting | average loss | plateaus | " + " | ".join(TASKS) + " |")
print("|---|---|---|---|---|" + "---|" * len(TASKS))
for c in CONFIGS:
    r = rows[c]
    per_task = [ms([x[0][i] for x in r]) for i in range(len(TASKS))]
    pl = ms([x[4] for x in r], "{:.1f}")
    print(f"| {c} | {ms([x[1] for x in r])} | {ms([x[2] for x in r])} | {ms([x[3] for x in r])} | {pl} | " + " | ".join(per_task) + " |")
