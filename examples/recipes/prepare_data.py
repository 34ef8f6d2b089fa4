"""Writes the recipes' data as JSON Lines under examples/recipes/data/ (needs the Hugging Face hub, or
its local cache with HF_HUB_OFFLINE=1). Run from anywhere:

    python examples/recipes/prepare_data.py gsm8k           # openai/gsm8k (main): 7,473 train, 1,319 test
    python examples/recipes/prepare_data.py ultrafeedback   # trl-lib/ultrafeedback_binarized: ~62k train, 1k test

GSM8K rows become {"prompt", "answer"}: the question plus an instruction to end with "#### <number>",
which the `numeric_answer` builtin reads, and GSM8K's own solution (its number after "####" is the
reference). UltraFeedback rows stay {"chosen", "rejected"} conversations (TRL's implicit prompt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
INSTRUCTION = ("Solve the problem step by step. Then write the final answer, a number alone, on the last "
               "line after '#### ' (for example: #### 42).")
SOURCES = {  # name -> (hub id, config, {split: output file})
    "gsm8k": ("openai/gsm8k", "main", {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}),
    "ultrafeedback": ("trl-lib/ultrafeedback_binarized", None,
                      {"train": "ultrafeedback_train.jsonl", "test": "ultrafeedback_test.jsonl"}),
}


def gsm8k_row(record: dict) -> dict:
    return {"prompt": f"{record['question'].strip()}\n\n{INSTRUCTION}", "answer": record["answer"]}


def ultrafeedback_row(record: dict) -> dict:
    return {"chosen": record["chosen"], "rejected": record["rejected"]}


ROW = {"gsm8k": gsm8k_row, "ultrafeedback": ultrafeedback_row}


def write(name: str, out_dir: Path = DATA) -> list[Path]:
    from datasets import load_dataset

    hub_id, config, splits = SOURCES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, file in splits.items():
        ds = load_dataset(hub_id, config, split=split)
        path = out_dir / file
        with open(path, "w") as f:
            for record in ds:
                f.write(json.dumps(ROW[name](record)) + "\n")
        print(f"wrote {len(ds)} rows of {hub_id} [{split}] to {path}")
        written.append(path)
    return written


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", choices=sorted(SOURCES))
    p.add_argument("--out", type=Path, default=DATA, help=f"output directory (default {DATA})")
    args = p.parse_args()
    for n in args.names:
        write(n, args.out)
