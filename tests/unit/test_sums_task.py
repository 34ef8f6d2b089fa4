"""The SmolLM2 recipes' sums task: the committed data is what the script writes, held-out sums are never
trained on, and every committed DPO pair is (correct, wrong) under the GRPO recipe's own reward."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fleetrl.reward.builtins import make_builtin

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _question(row: dict) -> str:
    return row["prompt"][0]["content"]


def test_committed_sums_are_what_the_script_writes_and_held_out_is_disjoint():
    spec = importlib.util.spec_from_file_location("make_sums_data", ROOT / "examples" / "make_sums_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, held = mod.rows()
    assert train == _rows("sums_train.jsonl") and held == _rows("sums_eval.jsonl")
    assert len(train) == 336 and len(held) == 64
    assert not {_question(r) for r in train} & {_question(r) for r in held}
    for r in train + held:
        a, b = (int(x) for x in _question(r).removeprefix("What is ").split("?")[0].split(" + "))
        assert r["answer"] == a + b


def test_dpo_pairs_are_correct_vs_wrong_and_keep_their_split():
    score = make_builtin("numeric_answer", {"require_marker": False})
    questions = {"sums_pairs_train.jsonl": {_question(r) for r in _rows("sums_train.jsonl")},
                 "sums_pairs_eval.jsonl": {_question(r) for r in _rows("sums_eval.jsonl")}}
    for name, allowed in questions.items():
        pairs = _rows(name)
        assert pairs, name
        for p in pairs:
            assert _question(p) in allowed, (name, _question(p))
            chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
            assert chosen != rejected
            assert score([""], [chosen], answer=[p["answer"]]) == [1.0], (name, chosen)
            assert score([""], [rejected], answer=[p["answer"]]) == [0.0], (name, rejected)
