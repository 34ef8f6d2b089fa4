"""Multi-turn episodes end to end: real Ray, a vLLM CPU worker, a DeepSpeed learner, the two-turn
letters environment (examples/multiturn_tiny.yaml), a few synchronous steps.

Token exactness end to end: on tokens sampled with the learner's own weights (synchronous steps),
the learner's log-probs match the sampler's (mismatch/abs_logp_diff ~ 0) only if the learner sees
exactly the context the engine generated each turn from, observation tokens included.
"""

import json
from pathlib import Path

import pytest

from fleetrl.run.config import load_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multiturn_tiny.yaml"


def test_multiturn_tiny_trains_on_the_exact_episode_tokens(tmp_path, ray_local, tiny_policy):
    from transformers import AutoTokenizer

    steps = 3
    overrides = [f"run.output_dir={tmp_path}", "run.name=mt", f"run.steps={steps}", "run.log_samples=true",
                 "rl.max_staleness=0", "rollout.num_workers=1", "rl.prompts_per_step=8", "rl.group_size=4",
                 "learner.micro_batch_size=32"]
    run_dir = train(load_config(EXAMPLE, overrides), config_path=EXAMPLE)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert 1.0 < r["episode/turns"] <= 2.0, r  # most episodes reach the second turn
        assert 0.0 < r["episode/observation_token_share"] < 1.0
        assert r["env/errors"] == 0 and r["env/time_s"] >= 0.0
        assert "reward/turn_1" in r and "reward/turn_2" in r
        # Episode reward = sum of its turn rewards (no reward functions in this config).
        assert 0.0 <= r["reward/mean"] <= 2.0
        assert r["mismatch/abs_logp_diff"] < 1e-3, r

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == steps * 8 * 4
    two_turns = [s for s in samples if s["episode"]["turns"] == 2]
    assert two_turns
    for s in two_turns:
        ids, mask = s["completion_ids"], s["completion_mask"]
        obs = [t for t, m in zip(ids, mask) if m == 0]
        row_second = s["episode"]["messages"][2]["content"]
        assert tok.decode(obs).endswith(f"<|im_start|>user\n{row_second}<|im_end|>\n<|im_start|>assistant\n")
        first_turn = ids[: mask.index(0)]
        assert tok.decode(first_turn, skip_special_tokens=True) == s["episode"]["messages"][1]["content"]
        assert abs(s["reward"] - sum(s["episode"]["turn_rewards"])) < 1e-6
