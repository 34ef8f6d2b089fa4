"""CISPO (MiniMax-M1): a clipped, detached importance weight on a REINFORCE-style objective, the
gradient flowing through every token, against numbers worked out by hand; and algorithm: cispo."""

from __future__ import annotations

import math

import pytest
import torch

from fleetrl.algos import ONLINE_ALGORITHMS, POLICY_LOSSES
from fleetrl.run.config import ConfigError, config_from_dict

cispo = POLICY_LOSSES.get("cispo")  # as the learner reaches it
ppo = POLICY_LOSSES.get("ppo")
NAN, INF = float("nan"), float("inf")

# Row 0: 2 tokens + padding (garbage); row 1: 3 tokens.
# Log-ratios: row 0 [0.2, 2.0] (e^2 = 7.39: above the cap 1 + 3 = 4); row 1 [-0.1, 0.0, -3.0].
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
LOGP = torch.tensor([[-1.0, -0.5, NAN], [-0.3, -2.0, -4.0]])
OLD = torch.tensor([[-1.2, -2.5, INF], [-0.2, -2.0, -1.0]])
ADV = torch.tensor([1.0, -1.0])
W = [[math.exp(0.2), 4.0], [math.exp(-0.1), 1.0, math.exp(-3.0)]]  # weights: truncated at 4, no lower bound


def run(loss_fn=cispo, **kw):
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = loss_fn(logp, OLD, ADV, MASK, **kw)
    loss.backward()
    return loss, stats, logp.grad


def test_loss_and_every_tokens_gradient_by_hand():
    # loss_t = -A * w_t * logp_t, token-mean over the 5 valid tokens.
    loss, stats, grad = run(clip_low=1.0, clip_high=3.0)
    terms = [-1 * W[0][0] * -1.0, -1 * W[0][1] * -0.5, W[1][0] * -0.3, W[1][1] * -2.0, W[1][2] * -4.0]
    assert loss.item() == pytest.approx(sum(terms) / 5, abs=1e-6)
    # d/dlogp_t = -A * w_t / 5: the truncated token (w = 4) still gets its gradient; padding gets 0.
    expected = torch.tensor([[-W[0][0] / 5, -4.0 / 5, 0.0], [W[1][0] / 5, 1.0 / 5, W[1][2] / 5]])
    torch.testing.assert_close(grad, expected)
    assert stats["clip_frac"].item() == pytest.approx(1 / 5)  # only the e^2 weight was truncated
    assert stats["ratio_max"].item() == pytest.approx(math.exp(2.0), rel=1e-6)
    ratios = [math.exp(x) for x in (0.2, 2.0, -0.1, 0.0, -3.0)]
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 5, rel=1e-6)
    k3 = [math.exp(x) - x - 1 for x in (0.2, 2.0, -0.1, 0.0, -3.0)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert stats["dual_clip_frac"].item() == 0.0


def test_where_ppo_drops_a_token_cispo_keeps_it():
    # PPO (clip 0.2): the e^2 token with A > 0 is clipped -> no gradient; CISPO: weight 1 + 0.2.
    _, _, ppo_grad = run(ppo, clip_low=0.2, clip_high=0.2)
    assert ppo_grad[0, 1] == 0
    _, stats, grad = run(clip_low=0.2, clip_high=0.2)
    assert grad[0, 1].item() == pytest.approx(-1.2 / 5)
    # Weights in [0.8, 1.2]: e^0.2 = 1.221 -> 1.2 too, and e^-3 is raised to 0.8: 3 of 5 truncated.
    torch.testing.assert_close(grad, torch.tensor([[-1.2, -1.2, 0.0], [W[1][0], 1.0, 0.8]]) / 5)
    assert stats["clip_frac"].item() == pytest.approx(3 / 5)


def test_the_weight_is_detached():
    # One token, A = 1, log-ratio 0.5 inside the range: d/dlogp(-sg(e^0.5) * logp) = -e^0.5 (not
    # -e^0.5 * (1 + logp), which a weight with gradient would add).
    logp = torch.tensor([[-2.0]], requires_grad=True)
    cispo(logp, torch.tensor([[-2.5]]), torch.tensor([1.0]), torch.ones(1, 1))[0].backward()
    assert logp.grad.item() == pytest.approx(-math.exp(0.5))


def test_padding_cannot_leak_nan_and_dual_clip_is_refused():
    loss, _, grad = run()
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0, 2] == 0
    with pytest.raises(ValueError, match="no dual clip"):
        run(dual_clip=3.0)


def test_algorithm_cispo_in_the_config():
    base = {"algorithm": "cispo", "data": {"path": "x.jsonl"},
            "reward": {"functions": [{"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]}}
    cfg = config_from_dict(base)
    loss = cfg.learner.loss
    assert (loss.policy_loss, loss.clip_low, loss.clip_high, loss.agg) == ("cispo", 1.0, 3.0, "token-mean")
    algo = ONLINE_ALGORITHMS.get("cispo")
    assert (algo.advantage, algo.per_token, algo.critic) == ("grpo", False, False)
    assert cfg.paper_defaults_applied == {"learner.loss.policy_loss": "cispo", "learner.loss.clip_low": 1.0,
                                          "learner.loss.clip_high": 3.0}
    with pytest.raises(ConfigError, match="'cispo' policy loss has no dual clip"):
        config_from_dict(base, ["learner.loss.dual_clip=3"])
    # Any group algorithm may take the loss by name; a misspelt one says what exists.
    mixed = config_from_dict({**base, "algorithm": "grpo"}, ["learner.loss.policy_loss=cispo"])
    assert (mixed.learner.loss.policy_loss, mixed.learner.loss.clip_low) == ("cispo", 0.2)
    with pytest.raises(ConfigError, match=r"unknown policy loss 'cisp' \(did you mean 'cispo'\?\)"):
        config_from_dict(base, ["learner.loss.policy_loss=cisp"])
