"""GSPO: the sequence-level, length-normalised importance ratio and clip (Zheng et al. 2025),
against numbers worked out by hand, and its place in the config (algorithm: gspo)."""

from __future__ import annotations

import math

import pytest
import torch

from fleetrl.algos import ONLINE_ALGORITHMS, POLICY_LOSSES
from fleetrl.run.config import config_from_dict, dump_config

gspo = POLICY_LOSSES.get("gspo")  # as the learner reaches it
NAN, INF = float("nan"), float("inf")

# Row 0: 2 tokens + 1 padding (garbage that must not leak); row 1: 3 tokens.
# Log-ratios: row 0 [0.2, 0.4] -> mean 0.3 -> s0 = e^0.3; row 1 [-0.1, 0.0, 0.1] -> mean 0 -> s1 = 1.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
OLD = torch.tensor([[-1.0, -2.0, INF], [-1.0, -1.0, -1.0]])
LOGP = torch.tensor([[-0.8, -1.6, NAN], [-1.1, -1.0, -0.9]])
ADV = torch.tensor([1.0, -1.0])
S0 = math.exp(0.3)


def run(adv=ADV, **kw):
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = gspo(logp, OLD, adv, MASK, **kw)
    loss.backward()
    return loss, stats, logp.grad


def test_sequence_ratio_clipped_as_a_whole_by_hand():
    # clip 0.2: s0 = 1.3499 > 1.2 with A = +1 -> both of row 0's tokens take the clipped -1.2 (no
    # gradient); row 1: s1 = 1 inside the range -> -A * s1 = 1 on each token.
    # seq-mean-token-mean: (-1.2 + 1) / 2 = -0.1.
    loss, stats, grad = run(clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    # Row 1's tokens: d(-A * s_{1,t})/dlogp_t = s1 = 1, times 1/3 (token mean) and 1/2 (sequence mean).
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    # Stats over the 5 valid tokens: row 0's two are clipped; each token sees its sequence's ratio.
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["dual_clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx((2 * S0 + 3 * 1.0) / 5, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(S0, abs=1e-6)
    k3 = [math.exp(x) - x - 1 for x in (0.2, 0.4, -0.1, 0.0, 0.1)]  # KL(old || new), per token
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 5, abs=1e-6)


def test_token_form_has_the_sequence_objectives_value_and_gradient():
    # Inside the clip range the loss is mean_i(-A_i * s_i) with s_i = exp(mean_t(logp - old)):
    # (-e^0.3 + 1) / 2, and d/dlogp_t = -A_i * s_i / |y_i| / 2 -> row 0: -e^0.3 / 4, row 1: 1 / 6.
    loss, stats, grad = run(clip_low=0.5, clip_high=0.5, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((1 - S0) / 2, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-S0 / 4, -S0 / 4, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    assert stats["clip_frac"].item() == 0.0

    # The same by autograd on the sequence-level formula written directly.
    logp = torch.tensor([[-0.8, -1.6], [-1.0, -1.0]], requires_grad=True)  # row 1 cut to 2 tokens
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    s = torch.exp((logp - old).mean(dim=-1))
    (-(ADV * s).mean()).backward()
    logp2 = logp.detach().clone().requires_grad_(True)
    loss, _ = gspo(logp2, old, ADV, torch.ones(2, 2), clip_low=0.5, clip_high=0.5, agg="seq-mean-token-mean")
    loss.backward()
    torch.testing.assert_close(logp2.grad, logp.grad)


def test_the_ratio_is_length_normalised():
    # Every token at log-ratio 0.3: the sequence ratio is e^0.3 whatever the length (a product of
    # token ratios would be e^0.6 and e^0.9).
    for length in (2, 3):
        logp, old = torch.full((1, length), -0.7), torch.full((1, length), -1.0)
        _, stats = gspo(logp, old, torch.tensor([1.0]), torch.ones(1, length), clip_low=0.5, clip_high=0.5)
        assert stats["ratio_max"].item() == pytest.approx(S0, abs=1e-6)


def test_dual_clip_caps_a_bad_sequence_with_a_huge_ratio():
    # A = -1, log-ratios [3, 3]: s = e^3 = 20.09; the clipped branch (-A * 1.2) is smaller, so the
    # loss would be 20.09 per token; dual_clip 3 caps it at -A * 3 = 3 (and no gradient).
    logp = torch.tensor([[2.0, 2.0]], requires_grad=True)
    loss, stats = gspo(logp, torch.tensor([[-1.0, -1.0]]), torch.tensor([-1.0]), torch.ones(1, 2),
                       clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and stats["dual_clip_frac"].item() == 1.0
    assert logp.grad.abs().sum().item() == 0.0


def test_padding_cannot_leak_nan_and_an_empty_row_is_zero():
    loss, _, grad = run(clip_low=3e-4, clip_high=4e-4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0, 2] == 0
    empty = torch.zeros(2, 3, dtype=torch.long)
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = gspo(logp, OLD, ADV, empty)
    loss.backward()
    assert loss.item() == 0.0 and stats["ratio_max"].item() == 0.0 and torch.isfinite(logp.grad).all()


def test_algorithm_gspo_takes_the_papers_clip_range_unless_set():
    base = {"algorithm": "gspo", "data": {"path": "x.jsonl"},
            "reward": {"functions": [{"name": "l", "kind": "builtin", "builtin": "letter_fraction"}]}}
    cfg = config_from_dict(base)
    loss = cfg.learner.loss
    assert (loss.policy_loss, loss.clip_low, loss.clip_high) == ("gspo", 3e-4, 4e-4)
    assert loss.agg == "seq-mean-token-mean"  # the paper's mean over sequences of token means
    algo = ONLINE_ALGORITHMS.get("gspo")
    assert (algo.advantage, algo.policy_loss, algo.per_token, algo.critic) == ("grpo", "gspo", False, False)
    # `fleetrl config show` names the defaults it used; a key the config sets wins.
    first = dump_config(cfg).splitlines()[0]
    assert first.startswith("# gspo paper defaults used") and "learner.loss.clip_low=0.0003" in first
    cfg = config_from_dict(base, ["learner.loss.clip_high=1e-3"])
    assert (cfg.learner.loss.clip_low, cfg.learner.loss.clip_high) == (3e-4, 1e-3)
    assert "learner.loss.clip_high" not in cfg.paper_defaults_applied
