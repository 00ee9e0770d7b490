#!/usr/bin/env python3
"""Word-manipulation tasks on the embedded corpus's sentences for the adapter-composition study
(docs/results/composition.md): four source tasks an adapter is trained on (copy the sentence, give its first
word, drop its first word, give its second word) and a held-out task none is trained on (give the last word),
each as alpaca records, 1000 for training and 100 for validation with no sentence shared. The reversal task
(scripts/make_reverse_task.py) and the quickstart questions are the two other sources. Six more tasks follow
for the multi-task instruction-tuning study (docs/results/lora-vs-full.md): the third word, drop the last
word, the words in reverse order, count the words, swap the first two words, the first and last words.
Deterministic (seed 1; a task's records do not depend on the tasks after it).

    python3 scripts/make_compose_tasks.py OUT_DIR    # writes OUT_DIR/<task>-{train,valid}.jsonl
"""
import json
import os
import random
import re
import sys

root = os.path.join(os.path.dirname(__file__), "..")
text = open(os.path.join(root, "assets", "data", "pretrain.txt")).read()
sentences = sorted({s.strip() for s in re.split(r"[.!?]", text) if 3 <= len(s.split()) <= 7})
rng = random.Random(1)
rng.shuffle(sentences)

TASKS = {
    "copy": ("Repeat the sentence.", lambda w: " ".join(w)),
    "first": ("Give the first word.", lambda w: w[0]),
    "drop-first": ("Drop the first word.", lambda w: " ".join(w[1:])),
    "second": ("Give the second word.", lambda w: w[1]),
    "last": ("Give the last word.", lambda w: w[-1]),
    "third": ("Give the third word.", lambda w: w[2]),
    "drop-last": ("Drop the last word.", lambda w: " ".join(w[:-1])),
    "reverse-words": ("Reverse the order of the words.", lambda w: " ".join(reversed(w))),
    "count": ("Count the words.", lambda w: str(len(w))),
    "swap": ("Swap the first two words.", lambda w: " ".join([w[1], w[0]] + w[2:])),
    "first-last": ("Give the first and the last word.", lambda w: w[0] + " " + w[-1]),
}

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for i, (name, (instruction, answer)) in enumerate(TASKS.items()):
    pool = sentences[:]
    random.Random(10 + i).shuffle(pool)
    for split, rows in [("valid", pool[:100]), ("train", pool[100:1100])]:
        with open(os.path.join(out, f"{name}-{split}.jsonl"), "w") as f:
            for s in rows:
                words = s.split()
                f.write(json.dumps({"instruction": instruction, "input": " ".join(words),
                                    "output": answer(words)}) + "\n")
