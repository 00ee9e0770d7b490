#!/usr/bin/env python3
"""Generates the texts shipped under assets/data (deterministic, standard library only).

    python scripts/make_assets.py [--out assets/data]

- pretrain.txt: short stories about people, things, colours and places (documents separated by blank lines),
  with fixed world knowledge about the things ("It is used to write letters.", "A pen usually stays in the
  drawer."). The default model (assets/default-model) was pre-trained on it with `factune pretrain`.
- quickstart-train.jsonl / quickstart-valid.jsonl: alpaca records asking about that knowledge ("What is a pen
  used for?" -> "It is used to write letters."). The base model knows the facts but has never seen the
  question/answer format: before fine-tuning it continues the text instead of answering. The validation
  questions are about things no training question mentions, so answering them needs the base model's own
  knowledge: fine-tuning has to teach the format, not the answers.
- chat-sample.jsonl: the same questions as chat conversations, to exercise the chat data path.
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
# Fixed world knowledge: what each thing is used for and where it usually stays. The corpus states it again and
# again, so the pre-trained model knows it; the quickstart asks about it in a question/answer format.
USES = {"ball": "play games", "box": "keep toys", "cup": "drink tea", "hat": "cover the head", "book": "read stories",
        "kite": "fly in the wind", "car": "drive to town", "bag": "carry things", "pen": "write letters",
        "doll": "play house", "bike": "ride to school", "coat": "stay warm", "lamp": "light the room",
        "shoe": "walk outside", "key": "open the door", "drum": "make music", "boat": "cross the lake",
        "sock": "keep feet warm", "bell": "call the class", "fish": "feed the cat"}
HOMES = {"ball": "in the yard", "box": "in the attic", "cup": "in the cupboard", "hat": "on the hook",
         "book": "on the shelf", "kite": "in the shed", "car": "in the garage", "bag": "by the bed",
         "pen": "in the drawer", "doll": "in the toy chest", "bike": "in the shed", "coat": "on the hook",
         "lamp": "on the desk", "shoe": "by the door", "key": "in the drawer", "drum": "in the music room",
         "boat": "on the lake", "sock": "in the drawer", "bell": "at the school", "fish": "in the pond"}
# Things whose questions appear only in the validation set: answering them needs the base model's knowledge.
HELD_OUT = ["pen", "boat", "lamp", "bell", "kite", "sock"]

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
        # World knowledge about the thing just named, in the words the quickstart's answers use.
        if rng.random() < 0.5:
            s.append(rng.choice([f"It is used to {USES[t]}.", f"It usually stays {HOMES[t]}."]))
    order = facts[:]
    rng.shuffle(order)
    for _, t, _, pl in order:
        s.append(f"The {t} is {pl}.")
    t = rng.choice(things)
    s.append(rng.choice([f"A {t} is used to {USES[t]}.", f"A {t} usually stays {HOMES[t]}."]))
    if rng.random() < 0.7:
        s.append(f"{rng.choice(people)} {rng.choice(LIKES)}.")
    if rng.random() < 0.3:
        s.append(rng.choice(FILLER))
    return " ".join(s)


def question(rng, things):
    """A question about what a thing is for or where it usually stays, and the answer as a sentence."""
    t = rng.choice(things)
    if rng.random() < 0.5:
        return f"What is a {t} used for?", f"It is used to {USES[t]}."
    return f"Where does a {t} usually stay?", f"It usually stays {HOMES[t]}."


INSTRUCTION = "Answer the question."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "data"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(20261123)
    with open(os.path.join(a.out, "pretrain.txt"), "w") as f:
        for _ in range(12000):
            f.write(story(rng) + "\n\n")
    seen = [t for t in THINGS if t not in HELD_OUT]
    for name, things, n in [("quickstart-train.jsonl", seen, 1000), ("quickstart-valid.jsonl", HELD_OUT, 100)]:
        with open(os.path.join(a.out, name), "w") as f:
            for _ in range(n):
                q, ans = question(rng, things)
                f.write(json.dumps({"instruction": INSTRUCTION, "input": q, "output": ans}) + "\n")
    with open(os.path.join(a.out, "chat-sample.jsonl"), "w") as f:
        for _ in range(50):
            q, ans = question(rng, THINGS)
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
            f.write(json.dumps({"messages": msgs}) + "\n")


if __name__ == "__main__":
    main()
