#!/usr/bin/env python3
"""A small chat data set about the 1911 Britannica article on Shakespeare, for the demo.

Each record asks about one sentence of the article and answers by quoting it:
- a sentence naming a year: "According to the article, what happened in YEAR?";
- otherwise one naming a subject the article treats ("his father", "the First Folio", ...):
  "What does the article say about SUBJECT?".
The answer is the sentence itself, whitespace normalised. Sentences are taken from the text
after the first OFFSET bytes (the demo's perplexity text comes from before it), shuffled with a
fixed seed and split into train and held-out sets, so every run writes the same files.

Usage: gen_chat_set.py TEXT OUT_DIR [--train N] [--eval N] [--offset BYTES]
Writes OUT_DIR/chat_train.jsonl and OUT_DIR/chat_eval.jsonl in the chat format
({"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}).
"""
import argparse
import json
import random
import re
from pathlib import Path

SEED = 1911
SUBJECTS = [
    "his father", "his mother", "Stratford", "the Globe", "the First Folio", "the sonnets",
    "Hamlet", "Macbeth", "King Lear", "Othello", "the Tempest", "Romeo and Juliet",
    "Venus and Adonis", "Lucrece", "Ben Jonson", "Marlowe", "the Lord Chamberlain",
    "Southampton", "Anne Hathaway", "New Place", "the quartos", "Heminge", "Condell",
    "Greene", "Falstaff", "the Blackfriars",
]


def sentences(text: str):
    # Drop the scan headers and page markers, join the hard-wrapped lines.
    lines = [
        l for l in text.splitlines()
        if not l.startswith(("#", "p.")) and l.strip()
    ]
    flat = re.sub(r"\s+", " ", " ".join(lines))
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
        s = s.strip()
        if 60 <= len(s) <= 260 and s.count('"') % 2 == 0:
            yield s


def question(s: str):
    year = re.search(r"\b(1[5-6]\d\d)\b", s)
    if year:
        return f"According to the Britannica article on Shakespeare, what happened in {year.group(1)}?"
    for subject in SUBJECTS:
        if subject.lower() in s.lower():
            return f"What does the Britannica article on Shakespeare say about {subject}?"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("text")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--offset", type=int, default=8192)
    a = ap.parse_args()
    text = Path(a.text).read_text(encoding="utf-8")[a.offset:]
    pairs, seen = [], set()
    for s in sentences(text):
        q = question(s)
        if q and q not in seen:
            seen.add(q)
            pairs.append((q, s))
    random.Random(SEED).shuffle(pairs)
    need = a.train + a.eval
    if len(pairs) < need:
        raise SystemExit(f"{a.text}: only {len(pairs)} question/answer pairs, {need} asked for")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in [("chat_train.jsonl", pairs[:a.train]), ("chat_eval.jsonl", pairs[a.train:need])]:
        with open(out / name, "w", encoding="utf-8") as f:
            for q, s in part:
                record = {"messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": s},
                ]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{a.train} training and {a.eval} held-out conversations in {out}")


if __name__ == "__main__":
    main()
