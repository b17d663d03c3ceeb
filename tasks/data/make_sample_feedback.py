"""Regenerates sample_feedback.jsonl: `python tasks/data/make_sample_feedback.py`.

A tiny log with a learnable pattern: correct sums and polite replies get a
thumbs up, wrong sums and rude replies a thumbs down. The signal is written in
the three accepted ways (label, feedback word, scalar reward) on purpose.
"""
import json
import os
import random

NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jo", "Kai"]
POLITE = ["Hello {n}, nice to meet you!", "Hi {n}, how can I help?",
          "Good day, {n}. Thank you!"]
RUDE = ["Go away, {n}.", "Not now, {n}.", "Whatever."]


def examples(rng):
  for _ in range(100):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    good = rng.random() < 0.5
    ans = a + b if good else a + b + rng.choice([-2, -1, 1, 2])
    yield f"What is {a} + {b}?", str(ans), good
  for _ in range(100):
    n = rng.choice(NAMES)
    good = rng.random() < 0.5
    yield f"Greet {n}.", rng.choice(POLITE if good else RUDE).format(n=n), good


def main():
  rng = random.Random(0)
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_feedback.jsonl")
  with open(out, "w", encoding="utf-8") as f:
    for i, (prompt, response, good) in enumerate(examples(rng)):
      rec = {"id": f"s{i:03d}", "prompt": prompt}
      kind = i % 3
      # TRL-style `completion` for some label records, `response` otherwise.
      rec["completion" if kind == 0 and i % 2 else "response"] = response
      if kind == 0:
        rec["label"] = good
      elif kind == 1:
        rec["feedback"] = rng.choice(["thumbs_up", "up"] if good else ["thumbs_down", "down"])
      else:
        rec["reward"] = 1.0 if good else -1.0
      f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
