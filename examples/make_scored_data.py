"""Writes the scored-feedback example's data (examples/data/scored_{train,eval}.jsonl).

Rows are prompt / completion / stars on the synthetic "letters" task: a completion mixes the letter
the prompt asks for with other letters, and its rating is 1 + 4 * (share of the asked letter),
rounded (1 = none of it, 5 = all of it), the way a 1-5 star rating would grade it. With
kto.score_threshold: 3.5, four and five stars are desirable. Deterministic (train: seed 0,
held-out: seed 1). Run from the repository root:
    python examples/make_scored_data.py
"""

from __future__ import annotations

import random
from pathlib import Path

from fleetrl.testing.tasks import LETTERS, letters_task, write_jsonl

DATA = Path(__file__).resolve().parent / "data"
TRAIN_ROWS, EVAL_ROWS = 512, 64
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the asked letter in a completion


def scored_task(n: int, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "completion", "stars", "letter"}; every star level is equally common."""
    rng = random.Random(f"scored:{seed}")
    rows = []
    for i, row in enumerate(letters_task(n, seed)):
        letter, share = row["letter"], SHARES[i % len(SHARES)]
        length = rng.randint(4, 12)
        hits = round(share * length)
        others = [x for x in LETTERS if x != letter]
        chars = [letter] * hits + [rng.choice(others) for _ in range(length - hits)]
        rng.shuffle(chars)
        stars = 1 + round(4 * hits / length)
        rows.append({"prompt": row["prompt"], "completion": " " + "".join(chars), "stars": stars,
                     "letter": letter})
    return rows


FILES = {
    "scored_train.jsonl": lambda: scored_task(TRAIN_ROWS, seed=0),
    "scored_eval.jsonl": lambda: scored_task(EVAL_ROWS, seed=1),
}


def main(out_dir: Path = DATA) -> list[Path]:
    return [write_jsonl(make(), out_dir / name) for name, make in FILES.items()]


if __name__ == "__main__":
    for path in main():
        print(path)
