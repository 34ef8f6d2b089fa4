"""Online DPO and on-policy distillation end to end on the tiny model and the letters task (real Ray,
vLLM CPU workers, a DeepSpeed learner, a rule reward).

Online DPO: every step's pairs are counted (pairs + ties = prompts), the learner's pair loss reports
DPO's metrics and learns the preferences (mean margin > 0 over the second half), the reward is not broken.
The reference is given by name (online_dpo.reference_model_path=tiny, the starting model again).
OPD: the teacher is the online DPO run's final model (same tokenizer; `fleetrl train` checks it),
the student the fresh tiny model; the reverse KL to the teacher is finite on every step and falls.
"""

import json
import math
from pathlib import Path

import pytest

from fleetrl.run.config import load_config
from fleetrl.run.runtime import resolve_model
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def test_online_dpo_then_opd_from_its_model(tmp_path, ray_local):
    steps, prompts = 16, 16
    example = EXAMPLES / "online_dpo_tiny.yaml"
    # The reference given by name (online_dpo.reference_model_path): the starting model again, resolved like
    # model.path, so step 1's implicit rewards (policy - reference, before any update) are 0.
    run_dir = train(load_config(example, [f"run.output_dir={tmp_path}", "run.name=odpo", f"run.steps={steps}",
                                          f"rl.prompts_per_step={prompts}", "rl.group_size=4",
                                          "online_dpo.reference_model_path=tiny"]),
                    config_path=example)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert f"reference {resolve_model('tiny')}" in (run_dir / "train.log").read_text()
    assert abs(rows[0]["train/rewards/chosen"]) < 1e-3 and abs(rows[0]["train/rewards/rejected"]) < 1e-3, rows[0]
    for key in ("reward/mean", "online_dpo/pairs", "online_dpo/skipped_ties", "online_dpo/chosen_reward",
                "online_dpo/rejected_reward", "online_dpo/reward_gap", "train/loss", "train/rewards/margins",
                "train/rewards/accuracies", "train/rewards/chosen", "train/logps/chosen", "train/grad_norm",
                "staleness/max"):
        assert key in rows[-1], key
    assert all(r["online_dpo/pairs"] + r["online_dpo/skipped_ties"] == prompts for r in rows)
    assert all(r["online_dpo/reward_gap"] > 0 for r in rows)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    half = rows[steps // 2:]
    assert mean(r["train/rewards/margins"] for r in half) > 0, [r["train/rewards/margins"] for r in rows]
    assert all(0 <= r["train/rewards/accuracies"] <= 1 for r in rows)  # ~0.6 over the second half, noisy
    first, last = mean(r["reward/mean"] for r in rows[:3]), mean(r["reward/mean"] for r in rows[-8:])
    assert last > 0.8 * first, (first, last, [r["reward/mean"] for r in rows])  # not broken
    teacher = run_dir / "final_model"
    assert (teacher / "config.json").is_file()

    example = EXAMPLES / "opd_tiny.yaml"
    steps = 8
    run_dir = train(load_config(example, [f"run.output_dir={tmp_path}", "run.name=opd", f"run.steps={steps}",
                                          f"teacher.model_path={teacher}"]), config_path=example)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert math.isfinite(r["distill/reverse_kl"]) and r["time/teacher"] > 0, r
        assert 0 < r["time/teacher_share"] < 1, r
        assert "train/policy_loss" in r and math.isfinite(r["train/policy_loss"])
    kl = [r["distill/reverse_kl"] for r in rows]
    assert kl[0] > 0.1 and mean(kl[-3:]) < 0.7 * kl[0], kl  # the student moves toward the teacher
    assert (run_dir / "final_model" / "config.json").is_file()
