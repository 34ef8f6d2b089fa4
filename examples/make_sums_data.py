"""Write the two-number addition task of the SmolLM2 recipes (examples/grpo_smollm2.yaml and friends).

Every pair (a, b) with 1 <= a, b <= 20 is one prompt; 64 pairs are held out (never trained on) for the
greedy evaluation. Deterministic: the committed files are what this script writes.
    python examples/make_sums_data.py            # writes examples/data/sums_{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT = "What is {a} + {b}? Answer with just the number."
HELD_OUT = 64


def rows() -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21)]
    random.Random(0).shuffle(pairs)
    make = [{"prompt": [{"role": "user", "content": PROMPT.format(a=a, b=b)}], "answer": a + b} for a, b in pairs]
    return make[HELD_OUT:], make[:HELD_OUT]


def main() -> None:
    out = Path(__file__).parent / "data"
    train, held = rows()
    for name, part in (("sums_train.jsonl", train), ("sums_eval.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} rows to {out / name}")


if __name__ == "__main__":
    main()
