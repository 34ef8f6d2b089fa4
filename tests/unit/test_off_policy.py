"""Importance weights (TIS, MIS) and the sampler/learner mismatch, against hand-computed values."""

import math

import pytest
import torch

from fleetrl.algos.off_policy import importance_weights, sampler_mismatch

LN2 = math.log(2.0)


def _case():
    # Log-ratios proximal - behaviour per token: ln 3, 0, -ln 4, (padding: huge garbage).
    prox = torch.tensor([[math.log(3.0), 0.0, -math.log(4.0), 1e9]])
    behav = torch.tensor([[0.0, 0.0, 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    return prox, behav, mask


def test_truncated_weights_by_hand():
    prox, behav, mask = _case()
    w, st = importance_weights(prox, behav, mask, "truncate", cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 0.25, 0.0]]))  # 3 -> capped at 2
    assert st["is/truncated_frac"].item() == pytest.approx(1 / 3)
    assert st["is/weight_mean"].item() == pytest.approx((3 + 1 + 0.25) / 3)
    assert st["is/weight_max"].item() == pytest.approx(3.0)
    assert not w.requires_grad


def test_masked_weights_by_hand():
    prox, behav, mask = _case()
    w, st = importance_weights(prox, behav, mask, "mask", low=0.5, high=2.0)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # 3 > 2 and 0.25 < 0.5 are dropped
    assert st["is/masked_frac"].item() == pytest.approx(2 / 3)


def test_weights_carry_no_gradient_and_padding_cannot_leak():
    prox = torch.tensor([[LN2, float("inf")]], requires_grad=True)
    behav = torch.tensor([[0.0, float("nan")]])
    w, _ = importance_weights(prox, behav, torch.tensor([[1, 0]]), "truncate", cap=5.0)
    assert torch.equal(w, torch.tensor([[2.0, 0.0]]))
    assert not w.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "clip"}, "unknown importance-sampling mode 'clip'"),
    ({"mode": "truncate", "cap": 0.0}, "cap must be > 0"),
    ({"mode": "mask", "low": 1.2, "high": 2.0}, "0 <= low < 1 < high"),
])
def test_bad_settings_say_what_is_allowed(kwargs, message):
    prox, behav, mask = _case()
    with pytest.raises(ValueError, match=message):
        importance_weights(prox, behav, mask, **kwargs)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        importance_weights(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3), "truncate")


def test_mismatch_by_hand():
    learner = torch.tensor([[-1.0, -2.0, -3.0]])
    sampler = torch.tensor([[-1.5, -2.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0]])
    out = sampler_mismatch(learner, sampler, mask)
    assert out["mismatch/abs_logp_diff"].item() == pytest.approx(0.25)
    # k3 with d = learner - sampler: exp(d) - d - 1; d = 0.5 and 0.
    assert out["mismatch/kl"].item() == pytest.approx((math.exp(0.5) - 0.5 - 1) / 2)
    assert out["mismatch/tokens"].item() == 2
