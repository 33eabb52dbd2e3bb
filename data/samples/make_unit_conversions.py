"""Writes unit-conversions.jsonl: the small prompt/response task of the default job.

A task a 135M model does not already do in our answer format, so the loss visibly falls within a
few dozen steps; deterministic (seeded), so the file in the repo is reproducible:
    python data/samples/make_unit_conversions.py
"""

import json
import random
from pathlib import Path

from durable import write_atomic

CONVERSIONS = [
    # (from unit, to unit, factor or function, value range)
    ("kilometres", "miles", lambda x: x * 0.621371, (1, 500)),
    ("miles", "kilometres", lambda x: x * 1.609344, (1, 300)),
    ("kilograms", "pounds", lambda x: x * 2.204623, (1, 200)),
    ("pounds", "kilograms", lambda x: x * 0.453592, (1, 400)),
    ("degrees Celsius", "degrees Fahrenheit", lambda x: x * 9 / 5 + 32, (-40, 120)),
    ("degrees Fahrenheit", "degrees Celsius", lambda x: (x - 32) * 5 / 9, (-40, 250)),
    ("litres", "US gallons", lambda x: x * 0.264172, (1, 200)),
    ("inches", "centimetres", lambda x: x * 2.54, (1, 100)),
    ("metres", "feet", lambda x: x * 3.280840, (1, 1000)),
    ("milligrams", "grams", lambda x: x / 1000, (1, 5000)),
]
QUESTIONS = [
    "Convert {v} {a} to {b}.",
    "How many {b} are in {v} {a}?",
    "What is {v} {a} in {b}?",
]


def main(n: int = 800, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = Path(__file__).with_name("unit-conversions.jsonl")
    rows = []
    for _ in range(n):
        a, b, fn, (lo, hi) = rng.choice(CONVERSIONS)
        v = rng.randint(lo, hi)
        prompt = rng.choice(QUESTIONS).format(v=v, a=a, b=b)
        response = f"{v} {a} is {fn(v):.2f} {b}."
        rows.append(json.dumps({"prompt": prompt, "response": response}) + "\n")
    write_atomic(out, "".join(rows))


if __name__ == "__main__":
    main()
