"""GRPO end to end: real Ray, 2 vLLM CPU workers, a DeepSpeed learner, a rule reward; reward rises."""

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.train import train

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_tiny_learns_and_writes_a_run(tmp_path, ray_local):
    steps = 24
    cfg = load_config(EXAMPLE, [f"run.output_dir={tmp_path}", "run.name=grpo", f"run.steps={steps}",
                                "run.save_every=12", "learner.lr=1e-2"])
    run_dir = train(cfg, config_path=EXAMPLE)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("reward/mean", "reward/letter", "train/policy_loss", "train/grad_norm", "train/lr",
                "train/entropy", "train/clip_frac", "response_length/mean", "tokens_per_s",
                "time/generate", "time/train", "time/weight_sync", "time/step"):
        assert key in rows[-1], key
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    # Samples come from the weights of the step before (sync mode: never staler than one step).
    assert all(r["staleness/max"] <= 1 for r in rows)

    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.05 and last > 1.5 * first, (first, last, [r["reward/mean"] for r in rows])

    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "step-000012" / "COMPLETE").is_file()
    assert (run_dir / "final_model" / "config.json").is_file()
