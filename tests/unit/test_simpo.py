"""SimPO: the pure loss against hand-computed values, its registration, its config section, and the
pair objective that trains it (no reference model) on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from fleetrl.algos import PREFERENCE_LOSSES
from fleetrl.algos.simpo import simpo_loss
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.objective import LocalModels
from fleetrl.learner.offline_config import REFERENCE_ALGORITHMS, SimPOConfig
from fleetrl.learner.rank import objective_class
from tests.unit.test_offline_ppo import hf_token_logps, tiny_lm

T = torch.tensor


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log1p(math.exp(x))


def test_simpo_loss_by_hand():
    # Pair 0: chosen -6 over 3 tokens (average -2), rejected -12 over 4 (average -3). beta 2, gamma
    # = beta * 0.5 = 1: z = 2 * -2 - 2 * -3 - 1 = 1, loss = -logsigmoid(1) = log(1 + e^-1).
    # Pair 1: chosen -2 over 1 token (average -2), rejected -2 over 2 (average -1): z = -4 + 2 - 1 = -3.
    pc = T([-6.0, -2.0], requires_grad=True)
    pr = T([-12.0, -2.0])
    losses, stats = simpo_loss(pc, pr, T([3.0, 1.0]), T([4.0, 2.0]), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(losses, T([softplus(-1.0), softplus(3.0)]))
    torch.testing.assert_close(losses, T([0.3132617, 3.0485873]))
    torch.testing.assert_close(stats["rewards/chosen"], T([-4.0, -4.0]))  # beta * average log-prob
    torch.testing.assert_close(stats["rewards/rejected"], T([-6.0, -2.0]))
    # d loss / d chosen_logps = -sigmoid(-z) * beta / |y_w|: descent raises the chosen answer.
    losses.sum().backward()
    sig = 1.0 / (1.0 + math.exp(1.0))
    torch.testing.assert_close(pc.grad, T([-sig * 2.0 / 3.0, -1.0 / (1.0 + math.exp(-3.0)) * 2.0]))


def test_simpo_label_smoothing_margin_and_length_normalisation_by_hand():
    pc, pr, nc, nr = T([-6.0]), T([-12.0]), T([3.0]), T([4.0])
    smoothed, _ = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), rel=1e-6)  # 0.413262
    no_margin, _ = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma_beta_ratio=0.0)
    assert no_margin.item() == pytest.approx(softplus(-2.0), rel=1e-6)  # z = 2 without gamma
    # Length-normalised: the same average log-probs over twice the tokens give the same loss.
    doubled, _ = simpo_loss(2 * pc, 2 * pr, 2 * nc, 2 * nr, beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(doubled, simpo_loss(pc, pr, nc, nr, beta=2.0, gamma_beta_ratio=0.5)[0])
    # Reference-free: reference log-probs change nothing.
    with_ref, _ = simpo_loss(pc, pr, nc, nr, T([-1.0]), T([-50.0]), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(with_ref, simpo_loss(pc, pr, nc, nr, beta=2.0, gamma_beta_ratio=0.5)[0])
    # An empty completion counts as one token (no division by zero).
    assert torch.isfinite(simpo_loss(T([0.0]), pr, T([0.0]), nr)[0]).all()
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(pc, pr, nc, nr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="one shape"):
        simpo_loss(pc, T([-1.0, -2.0]), nc, nr)


def test_simpo_is_registered_reference_free_with_the_authors_defaults():
    assert "simpo" in PREFERENCE_LOSSES and PREFERENCE_LOSSES.meta("simpo") == {"needs_reference": False}
    assert "simpo" not in REFERENCE_ALGORITHMS
    assert SimPOConfig() == SimPOConfig(beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.0)
    with pytest.raises(ValueError, match="extra|not permitted|unknown"):
        SimPOConfig.model_validate({"gamma": 1.0})  # the margin is gamma_beta_ratio (gamma / beta)


def test_simpo_objective_trains_on_the_policy_alone():
    cls = objective_class("simpo")
    assert not cls.needs_reference("simpo", None) and cls.reference_inputs("simpo") is None
    policy = tiny_lm(0)
    obj = cls(LocalModels(policy), options={"beta": 2.0, "gamma_beta_ratio": 0.5}, name="simpo")
    # Two pairs, right-padded; chosen and rejected of different lengths.
    c_ids = T([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]])
    c_attn = T([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    c_loss = T([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    r_ids = T([[5, 6, 20, 0, 0], [9, 30, 31, 0, 0]])
    r_attn = T([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    r_loss = T([[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]])
    micro = {"chosen_input_ids": c_ids, "chosen_attention_mask": c_attn, "chosen_loss_mask": c_loss,
             "rejected_input_ids": r_ids, "rejected_attention_mask": r_attn, "rejected_loss_mask": r_loss}
    stats = Stats()
    loss = obj.loss(micro, stats)
    assert obj.units(micro) == 2.0

    def seq(ids, attn, lm):
        lp = hf_token_logps(policy, {"input_ids": ids, "attention_mask": attn})
        return (lp * lm * attn).sum(-1), (lm * attn).sum(-1).float()

    (lc, nc), (lr, nr) = seq(c_ids, c_attn, c_loss), seq(r_ids, r_attn, r_loss)
    expected, _ = simpo_loss(lc, lr, nc, nr, beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(loss, expected.mean(), atol=1e-5, rtol=1e-5)
    out = stats.reduce(lambda t, op="sum": t)
    assert out["rewards/chosen"] == pytest.approx(float((2.0 * lc / nc).detach().mean()), abs=1e-5)
    assert out["rewards/margins"] == pytest.approx(out["rewards/chosen"] - out["rewards/rejected"], abs=1e-6)
    assert {"loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "num_tokens"} <= set(out)
