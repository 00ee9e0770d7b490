#!/usr/bin/env python3
"""A harder second task for the adapter studies: reverse the order of the words of a sentence from the
embedded corpus ("Mia has a purple cup." -> "cup purple a has Mia"). The default model knows the words but was
never trained to reorder them, so unlike the quickstart question/answer task it needs new behaviour, not
recall. Validation sentences never occur in training. Deterministic (seed 0).

    python3 scripts/make_reverse_task.py    # writes assets/data/reverse-{train,valid}.jsonl
"""
import json
import os
import random
import re

root = os.path.join(os.path.dirname(__file__), "..")
text = open(os.path.join(root, "assets", "data", "pretrain.txt")).read()
sentences = sorted({s.strip() for s in re.split(r"[.!?]", text) if 3 <= len(s.split()) <= 6})
rng = random.Random(0)
rng.shuffle(sentences)
valid, train = sentences[:100], sentences[100:1100]


def record(s):
    words = s.split()
    return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
            "output": " ".join(reversed(words))}


for name, rows in [("reverse-train.jsonl", train), ("reverse-valid.jsonl", valid)]:
    with open(os.path.join(root, "assets", "data", name), "w") as f:
        for s in rows:
            f.write(json.dumps(record(s)) + "\n")
print(f"{len(train)} training and {len(valid)} validation sentences ({len(sentences)} distinct in the corpus)")
