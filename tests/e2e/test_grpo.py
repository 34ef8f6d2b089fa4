"""GRPO end to end: real Ray, 2 vLLM CPU workers, a DeepSpeed learner, a rule reward.

Asynchronous (rl.max_staleness=2): the reward rises; no trained sample is staler than the bound;
weight updates land in flight; the run directory holds what the README promises; an interrupted run
resumes from its last finished checkpoint and trains every prompt exactly once. The GSPO/CISPO runs
are synchronous (rl.max_staleness=0): always the latest weights.
"""

import json
import re
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
    steps, per_step, k = 24, 16, 2
    overrides = [f"run.output_dir={tmp_path}", "run.name=grpo", "run.save_every=12", "learner.lr=1e-2",
                 "run.log_samples=true", f"rl.max_staleness={k}"]
    run_dir = train(load_config(EXAMPLE, overrides + [f"run.steps={steps}"]), config_path=EXAMPLE)

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("reward/mean", "reward/std", "reward/letter", "reward/errors", "train/policy_loss",
                "train/kl", "train/grad_norm", "train/lr", "train/entropy", "train/clip_frac",
                "response_length/mean", "response_length/max", "response_length/clip_ratio", "tokens_per_s",
                "time/generate", "time/reward", "time/reference", "time/train", "time/weight_sync",
                "time/step", "staleness/mean", "buffer/depth", "groups/dropped_stale", "time/learner_wait",
                "time/fleet_idle", "is/weight_mean", "is/weight_max", "is/truncated_frac"):
        assert key in rows[-1], key
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert all(0 <= r["staleness/max"] <= k for r in rows)
    assert max(r["staleness/max"] for r in rows) > 0  # the fleet ran ahead of the learner
    assert sum(r["rollout/in_flight_updates"] for r in rows) > 0  # weights changed mid-generation
    # Measured on tokens sampled with the learner's own weights (staleness 0): fp32 vLLM and the
    # learner agree, so what the importance weights correct is the lag.
    mismatch = [r["mismatch/abs_logp_diff"] for r in rows if "mismatch/abs_logp_diff" in r]
    assert mismatch and max(mismatch) < 1e-3, mismatch

    # Asynchronous runs vary with timing: compare the first 3 steps with the last 8 (more signal).
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-8:]) / 8
    assert last > first + 0.04 and last > 1.4 * first, (first, last, [r["reward/mean"] for r in rows])

    assert (run_dir / "config.yaml").is_file()
    console = (run_dir / "train.log").read_text()
    assert f"step {steps}/{steps}" in console  # the console, kept
    for service in ("learner (1 rank(s))", "rollout fleet (2 vLLM engine(s))"):  # start-up, with its seconds
        assert re.search(rf"fleetrl: {re.escape(service)} ready, [0-9.]+s after start", console), service
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
    samples = read_jsonl(run_dir / "samples.jsonl")
    for s in samples:
        per_prompt.setdefault(s["prompt_index"], set()).add(s["step"])
        # The bound holds for every trained sample: trained at step s, the learner held version s - 1.
        assert s["step"] - 1 - s["weight_version"] <= k, s
    # Every prompt trained in exactly one step, across the kill and the resume: the prompts started
    # but not trained at the end are in the last checkpoint; together they are every prompt started.
    assert all(len(v) == 1 for v in per_prompt.values())
    assert len(per_prompt) == 26 * per_step
    final = json.loads((run_dir / "checkpoints" / "step-000026" / "collector.json").read_text())
    pending = {i for i, _row in final["pending"]}
    assert not pending & set(per_prompt)
    assert pending | set(per_prompt) == set(range(final["prompts_submitted"]))


@pytest.mark.parametrize("algorithm", ["gspo", "cispo"])
def test_new_policy_losses_train(tmp_path, ray_local, algorithm):
    """GSPO and CISPO went in through the registries: the same tiny run trains with each (one
    rollout worker and a few small steps, so the suite stays within its budget). Two optimizer steps
    per rollout batch, so the second one is off-policy and the ratios (and GSPO's tiny clip) act.
    Trains = every step updates the policy (finite loss and grad norm, the weights reach the fleet)
    and the reward rises over the run."""
    steps = 12
    overrides = [f"run.output_dir={tmp_path}", f"run.name={algorithm}", f"run.steps={steps}",
                 "learner.lr=1e-2", "rollout.num_workers=1", "rl.prompts_per_step=8",
                 "rl.mini_batch_size=32", "learner.micro_batch_size=16", "rl.max_staleness=0"]
    cfg = load_config(EXAMPLE, overrides + [f"algorithm={algorithm}"])
    assert cfg.learner.loss.policy_loss == algorithm
    rows = read_jsonl(train(cfg, config_path=EXAMPLE) / "metrics.jsonl")
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert all(r["staleness/max"] == 0 and r["groups/dropped_stale"] == 0 for r in rows)  # synchronous
    for r in rows:
        for key in ("train/policy_loss", "train/grad_norm", "train/clip_frac", "train/ratio_mean"):
            assert key in r and r[key] == r[key] and abs(r[key]) < 1e6, (key, r)  # present and finite
    assert any(r["train/grad_norm"] > 0 for r in rows)
    assert all(r["optimizer_steps"] == 2 * r["step"] for r in rows)
    assert any(r["train/ratio_mean"] != 1.0 for r in rows)  # the second mini-batch is off-policy
    # The reward of the run's second half beats its first steps' (12 small noisy steps: no finer claim).
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    later = sum(r["reward/mean"] for r in rows[steps // 2:]) / (steps - steps // 2)
    assert later > first, (first, later, [r["reward/mean"] for r in rows])
