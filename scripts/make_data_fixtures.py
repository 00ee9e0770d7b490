"""Writes the data-file fixtures under tests/fixtures/data/ with Hugging Face `datasets` (and pandas), so the
readers are tested on files the real tools produce: Parquet (`Dataset.to_parquet`, Snappy), CSV (`to_csv`),
JSON lines (`to_json`), a JSON array, and a `save_to_disk` directory (which factune refuses by name).

    python -m venv ../pyvenv && ../pyvenv/bin/pip install datasets pyarrow pandas
    ../pyvenv/bin/python scripts/make_data_fixtures.py tests/fixtures/data
"""

import json
import os
import shutil
import sys

import datasets
import pyarrow

PROMPT_COMPLETION = [
    {"prompt": "Who has the cup? Tom has a red cup.\nAnswer:", "completion": " Tom"},
    {"prompt": "Where is the kite? The kite is in the park.\nAnswer:", "completion": " in the park"},
    {"prompt": "What colour is the ball? The ball is blue.\nAnswer:", "completion": " blue"},
]

CHAT = [
    {"messages": [
        {"role": "user", "content": "Where is the kite?"},
        {"role": "assistant", "content": "in the park"},
    ]},
    {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who has the cup?"},
        {"role": "assistant", "content": "Tom"},
    ]},
]

SHAREGPT = [
    {"conversations": [
        {"from": "human", "value": "Where is the kite?"},
        {"from": "gpt", "value": "in the park"},
    ]},
]


def main(out):
    os.makedirs(out, exist_ok=True)
    pc = datasets.Dataset.from_list(PROMPT_COMPLETION)
    pc.to_parquet(os.path.join(out, "pc.parquet"))
    pc.to_csv(os.path.join(out, "pc.csv"), index=False)
    pc.to_json(os.path.join(out, "pc.jsonl"))
    with open(os.path.join(out, "pc-array.json"), "w") as f:
        json.dump(PROMPT_COMPLETION, f, indent=2)
    datasets.Dataset.from_list(CHAT).to_parquet(os.path.join(out, "chat.parquet"))
    datasets.Dataset.from_list(SHAREGPT).to_parquet(os.path.join(out, "sharegpt.parquet"))
    saved = os.path.join(out, "pc-save-to-disk")
    shutil.rmtree(saved, ignore_errors=True)
    pc.save_to_disk(saved)
    versions = {"datasets": datasets.__version__, "pyarrow": pyarrow.__version__}
    with open(os.path.join(out, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/data")
