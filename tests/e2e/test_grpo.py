"""GRPO end to end: real Ray, 2 vLLM CPU workers, a DeepSpeed learner, a rule reward.

The reward rises; the run directory holds what the README promises; an interrupted run resumes from
its last finished checkpoint without training a prompt twice.
"""

import json
import shutil
from pathlib import Path

import pytest

from fleetrl.run.config import load_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_tiny_learns_writes_a_run_and_resumes(tmp_path, ray_local):
    steps, per_step = 24, 16
    overrides = [f"run.output_dir={tmp_path}", "run.name=grpo", "run.save_every=12", "learner.lr=1e-2",
                 "run.log_samples=true"]
    run_dir = train(load_config(EXAMPLE, overrides + [f"run.steps={steps}"]), config_path=EXAMPLE)

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("reward/mean", "reward/std", "reward/letter", "reward/errors", "train/policy_loss",
                "train/kl", "train/grad_norm", "train/lr", "train/entropy", "train/clip_frac",
                "response_length/mean", "response_length/max", "response_length/clip_ratio", "tokens_per_s",
                "time/generate", "time/reward", "time/reference", "time/train", "time/weight_sync", "time/step"):
        assert key in rows[-1], key
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert all(r["staleness/max"] == 0 for r in rows)  # sync mode: always the latest weights

    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.05 and last > 1.5 * first, (first, last, [r["reward/mean"] for r in rows])

    assert (run_dir / "config.yaml").is_file()
    assert f"step {steps}/{steps}" in (run_dir / "train.log").read_text()  # the console, kept
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "final_model" / "config.json").is_file()
    assert (run_dir / "checkpoints" / "step-000012" / "COMPLETE").is_file()

    # Interrupted after step 24's checkpoint was started but not finished: resume redoes 13..24.
    shutil.rmtree(run_dir / "checkpoints" / "step-000024")
    with pytest.raises(FileExistsError, match="run.resume=true"):
        train(load_config(EXAMPLE, overrides + ["run.steps=26"]), config_path=EXAMPLE)
    again = train(load_config(EXAMPLE, overrides + ["run.steps=26", "run.resume=true"]), config_path=EXAMPLE)
    assert again == run_dir
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 27))
    assert [r["weight_version"] for r in rows] == list(range(1, 27))
    per_prompt: dict[int, set] = {}
    for s in read_jsonl(run_dir / "samples.jsonl"):
        per_prompt.setdefault(s["prompt_index"], set()).add(s["step"])
    # The prompt stream continued from the checkpoint: every prompt trained in exactly one step.
    assert sorted(per_prompt) == list(range(26 * per_step))
    assert all(len(v) == 1 for v in per_prompt.values())
