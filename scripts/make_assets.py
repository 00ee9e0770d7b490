#!/usr/bin/env python3
"""Generates the texts shipped under assets/data (deterministic, standard library only).

    python scripts/make_assets.py [--out assets/data]

- pretrain.txt: short stories (documents separated by blank lines) about people, things, colours and places; the corpus the default model
  (assets/default-model) was pre-trained on with `factune pretrain`.
- quickstart-train.jsonl / quickstart-valid.jsonl: alpaca records asking a question about a story
  ("...\nQuestion: What color is the kite?" -> "The color of the kite is blue."). The corpus' recall
  sentences ("The color of the kite is blue.") teach the base model to retrieve facts from a story, but it has
  never seen the question/answer format: before fine-tuning it continues the story; LoRA teaches it to answer.
- chat-sample.jsonl: the same task as chat conversations, to exercise the chat data path.
"""
import argparse
import json
import os
import random

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Zoe", "Leo", "Ella", "Jack", "Nora", "Finn",
         "Ruby", "Owen", "Ivy", "Noah", "Lucy", "Adam", "Emma"]
THINGS = ["ball", "box", "cup", "hat", "book", "kite", "car", "bag", "pen", "doll", "bike", "coat", "lamp",
          "shoe", "key", "drum", "boat", "sock", "bell", "fish"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "purple"]
PLACES = ["in the garden", "on the table", "under the bed", "in the kitchen", "in the park", "on the chair",
          "in the car", "at school", "by the door", "on the roof"]
FILLER = ["It is a sunny day.", "The sky is grey.", "They are happy.", "It is very quiet.", "The wind is cold.",
          "Everyone is at home.", "It is late in the day.", "The birds sing.", "It rains a little.",
          "The sun is warm."]
LIKES = ["likes to play", "wants to go out", "is tired", "reads a book", "sings a song", "runs fast",
         "eats an apple", "looks at the sky"]


def story(rng):
    k = rng.choice([2, 2, 3])
    people = rng.sample(NAMES, k)
    things = rng.sample(THINGS, k)
    colors = rng.sample(COLORS, k)
    places = rng.sample(PLACES, k)
    facts = list(zip(people, things, colors, places))
    s = []
    if rng.random() < 0.5:
        s.append(rng.choice(FILLER))
    for p, t, c, _ in facts:
        s.append(f"{p} has a {c} {t}.")
    order = facts[:]
    rng.shuffle(order)
    for _, t, _, pl in order:
        s.append(f"The {t} is {pl}.")
    # Recall sentences restate a fact in another form, so predicting them means retrieving it from the story:
    # pre-training builds the retrieval skill, fine-tuning only has to teach the question/answer format.
    recall = [(f, kind) for f in facts for kind in range(3)]
    for (p, t, c, pl), kind in rng.sample(recall, len(facts) + 1):
        s.append([f"The color of the {t} is {c}.", f"The {t} belongs to {p}.", f"The {t} is still {pl}."][kind])
    if rng.random() < 0.7:
        s.append(f"{rng.choice(people)} {rng.choice(LIKES)}.")
    if rng.random() < 0.3:
        s.append(rng.choice(FILLER))
    return " ".join(s), facts


def question(rng, facts):
    """A question about one fact and its answer, a full sentence in the form of the corpus' recall sentences."""
    p, t, c, pl = rng.choice(facts)
    kind = rng.choice(["color", "who", "where"])
    if kind == "color":
        return f"What color is the {t}?", f"The color of the {t} is {c}."
    if kind == "who":
        return f"Who has the {t}?", f"The {t} belongs to {p}."
    return f"Where is the {t}?", f"The {t} is {pl}."


INSTRUCTION = "Read the story and answer the question."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "data"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(20261123)
    with open(os.path.join(a.out, "pretrain.txt"), "w") as f:
        for _ in range(12000):
            f.write(story(rng)[0] + "\n\n")
    for name, n in [("quickstart-train.jsonl", 2000), ("quickstart-valid.jsonl", 100)]:
        with open(os.path.join(a.out, name), "w") as f:
            for _ in range(n):
                text, facts = story(rng)
                q, ans = question(rng, facts)
                f.write(json.dumps({"instruction": INSTRUCTION, "input": f"{text}\nQuestion: {q}", "output": ans}) + "\n")
    with open(os.path.join(a.out, "chat-sample.jsonl"), "w") as f:
        for _ in range(50):
            text, facts = story(rng)
            q, ans = question(rng, facts)
            msgs = [{"role": "user", "content": f"{text}\n{q}"}, {"role": "assistant", "content": ans}]
            f.write(json.dumps({"messages": msgs}) + "\n")


if __name__ == "__main__":
    main()
