"""AdvantageStep: the online loop's advantages for any registered algorithm, without Ray (a fake
learner gives the reference log-probs)."""

from __future__ import annotations

import math

import pytest
import torch

from fleetrl.algos.advantages import grpo_advantages, rloo_advantages
from fleetrl.online.advantages import AdvantageStep
from fleetrl.run.config import config_from_dict

T = torch.tensor


class FakeLearner:
    def __init__(self, ref):
        self.ref, self.calls = ref, 0

    def compute_logprobs(self, batch, which, temperature):
        assert which == "reference"
        self.calls += 1
        return self.ref


def cfg_of(algorithm, *overrides):
    tree = {"algorithm": algorithm, "data": {"path": "x.jsonl"}, "critic": {"init": "policy"},
            "rl": {"group_size": 2, "prompts_per_step": 1}, "learner": {"micro_batch_size": 2},
            "reward": {"functions": [{"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]}}
    return config_from_dict(tree, overrides)


# Two samples of one prompt: prompt token 0, completion tokens 1-2 (row 1 has one, then padding).
BATCH = {
    "input_ids": T([[5, 6, 7], [5, 6, 0]]),
    "attention_mask": T([[1, 1, 1], [1, 1, 0]]),
    "loss_mask": T([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
    "old_logprobs": T([[0.0, -1.0, -1.0], [0.0, -2.0, 0.0]]),
}
REF = T([[0.0, -1.5, -1.0], [0.0, -1.0, 5.0]])  # log-ratio (policy - ref): row 0 [0.5, 0], row 1 [-1]
SCORES = T([1.0, 0.0])


@pytest.mark.parametrize("algorithm,estimate", [("grpo", grpo_advantages), ("gspo", grpo_advantages),
                                                ("cispo", grpo_advantages), ("rloo", rloo_advantages)])
def test_group_algorithms_dispatch_through_the_registry(algorithm, estimate):
    cfg = cfg_of(algorithm, "learner.loss.kl_coef=0")
    out = AdvantageStep(cfg, FakeLearner(REF))(dict(BATCH), SCORES)
    torch.testing.assert_close(out.advantages, estimate(SCORES, 2))
    assert out.critic_batch is None and "kl/reward_penalty_mean" not in out.metrics


def test_kl_in_reward_charges_each_sequence_its_kl_once():
    # k1 per token: row 0 [0.5, 0] -> 0.5, row 1 [-1] -> -1 (padding's 5.0 never counts).
    # coef 0.1: shaped rewards [1 - 0.05, 0 + 0.1] = [0.95, 0.1]; Dr.GRPO centres them: +-0.425.
    cfg = cfg_of("drgrpo", "learner.loss.kl_coef=0.1", "learner.loss.kl_in=reward",
                 "learner.loss.kl_estimator=k1")
    learner = FakeLearner(REF)
    batch = dict(BATCH)
    out = AdvantageStep(cfg, learner)(batch, SCORES)
    assert learner.calls == 1 and "ref_logprobs" in batch  # the learner gets them too
    torch.testing.assert_close(out.advantages, T([0.425, -0.425]))
    assert out.metrics["kl/reward_penalty_mean"] == pytest.approx((0.05 - 0.1) / 2)
    assert out.metrics["advantage/std"] == pytest.approx(math.sqrt(2 * 0.425**2))


def test_per_token_algorithms_give_token_advantages():
    cfg = cfg_of("reinforce_pp_baseline", "learner.loss.kl_coef=0.1", "learner.loss.kl_estimator=k1")
    out = AdvantageStep(cfg, FakeLearner(REF))(dict(BATCH), SCORES)
    assert out.advantages.shape == (2, 3) and out.advantages[:, 0].abs().sum() == 0
    assert out.metrics["kl/coef"] == pytest.approx(0.1) and "returns/mean" in out.metrics
