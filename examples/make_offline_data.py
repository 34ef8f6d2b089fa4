"""Writes the offline examples' data (examples/data/{sft,preference,unpaired}_*.jsonl).

Deterministic: the rows come from orchestrator/tasks.py with fixed seeds (train: seed 0,
held-out: seed 1), so running it again rewrites the same bytes. Run from the repository root:
    python examples/make_offline_data.py
"""

from __future__ import annotations

from pathlib import Path

from fleetrl.testing.tasks import preference_task, sft_task, unpaired_task, write_jsonl

DATA = Path(__file__).resolve().parent / "data"
TRAIN_ROWS, EVAL_ROWS = 256, 64

FILES = {
    "sft_train.jsonl": lambda: sft_task(TRAIN_ROWS, seed=0),
    "sft_eval.jsonl": lambda: sft_task(EVAL_ROWS, seed=1),
    "preference_train.jsonl": lambda: preference_task(TRAIN_ROWS, seed=0),
    "preference_eval.jsonl": lambda: preference_task(EVAL_ROWS, seed=1),
    "unpaired_train.jsonl": lambda: unpaired_task(2 * TRAIN_ROWS, seed=0),
    "unpaired_eval.jsonl": lambda: unpaired_task(EVAL_ROWS, seed=1),
}


def main(out_dir: Path = DATA) -> list[Path]:
    return [write_jsonl(make(), out_dir / name) for name, make in FILES.items()]


if __name__ == "__main__":
    for path in main():
        print(path)
