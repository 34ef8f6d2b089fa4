"""Loss functions against values worked out by hand in each test."""

import math

import pytest
import torch

from fleetrl.algos import POLICY_LOSSES
from fleetrl.algos.kl import kl_estimate
from fleetrl.algos.logprobs import entropy_from_logits, token_logprobs
from fleetrl.algos.preference import (
    dpo_loss,
    ipo_loss,
    kto_default_weights,
    kto_loss,
    kto_reference_point,
    kto_shifted_pairs,
    offline_binary_ppo_loss,
    orpo_loss,
    pairwise_reward_loss,
)
from fleetrl.algos.reduce import aggregate, masked_mean, masked_sum
from fleetrl.algos.value import explained_variance, value_loss

policy_loss = POLICY_LOSSES.get("ppo")  # as the learner reaches it

T = torch.tensor
NAN, INF = float("nan"), float("inf")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0
    )


def softplus(x):  # -logsigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------- logprobs / entropy


def test_token_logprobs_by_hand():
    logits = torch.zeros(1, 3, 3)
    logits[0, 0] = torch.log(T([0.2, 0.5, 0.3]))  # predicts token 1
    logits[0, 1] = 0.0  # uniform, predicts token 2
    logits[0, 2] = T([1000.0, -1000.0, 0.0])  # predicts past the end: unused
    ids = T([[2, 1, 0]])
    close(token_logprobs(logits, ids), [[0.0, math.log(0.5), math.log(1 / 3)]])


def test_token_logprobs_temperature():
    logits = torch.zeros(1, 2, 3)
    logits[0, 0] = T([2 * math.log(3), 0.0, 0.0])  # /2 -> [ln 3, 0, 0] -> probs [3/5, 1/5, 1/5]
    out = token_logprobs(logits, T([[1, 0]]), temperature=2.0)
    close(out, [[0.0, math.log(0.6)]])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, T([[1, 0]]), temperature=0.0)


def test_token_logprobs_matches_log_softmax_bf16_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    close(out[:, 1:], ref)
    close(out[:, 0], [0.0, 0.0])
    bf = token_logprobs(logits.bfloat16(), ids)
    assert bf.dtype == torch.float32
    close(bf[:, 1:], ref, atol=0.05)
    leaf = logits.clone().requires_grad_(True)
    token_logprobs(leaf, ids).sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[:, -1].abs().sum() == 0  # last logits unused


def test_token_logprobs_shape_error():
    with pytest.raises(ValueError, match="input_ids shape"):
        token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_entropy_from_logits_by_hand():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0] = 0.0  # uniform over 4 -> ln 4
    logits[0, 1] = T([100.0, 0.0, 0.0, 0.0])  # ~one-hot -> ~0
    logits[0, 2] = torch.log(T([0.5, 0.25, 0.125, 0.125]))  # 0.5ln2 + 0.25*2ln2 + 2*0.125*3ln2 = 1.75 ln2
    close(entropy_from_logits(logits), [[0.0, math.log(4), 0.0, 1.75 * math.log(2)]])


# ----------------------------------------------------------------------------------------- reductions


def test_masked_mean_and_sum_ignore_garbage():
    x = T([[1.0, 2.0, NAN], [4.0, INF, -INF], [NAN, NAN, NAN]])
    mask = T([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(masked_sum(x, mask), 7.0)
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0, 0.0])  # empty row -> 0, not NaN
    close(masked_mean(x, mask.bool(), dim=-1), [1.5, 4.0, 0.0])
    leaf = x.clone().requires_grad_(True)
    masked_mean(leaf, mask, dim=-1).sum().backward()
    close(leaf.grad, [[0.5, 0.5, 0], [1, 0, 0], [0, 0, 0]])


def test_masked_mean_float_weights():
    # weights act as weights: (1*1 + 3*0.5) / 1.5
    close(masked_mean(T([1.0, 3.0]), T([1.0, 0.5])), 2.5 / 1.5)


LOSS = T([[1.0, 2.0, 3.0, 50.0], [4.0, NAN, 60.0, 70.0], [80.0, 90.0, INF, 1.0]])
LMASK = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_aggregate_modes_by_hand():
    # token-mean: (1+2+3+4)/4
    close(aggregate(LOSS, LMASK, "token-mean"), 2.5)
    # seq-mean-token-mean: rows (1+2+3)/3 = 2 and 4/1 = 4; the empty third row is left out -> 3
    close(aggregate(LOSS, LMASK, "seq-mean-token-mean"), 3.0)
    # seq-mean-token-sum-norm: row sums 6, 4, 0 divided by T=4, mean over all 3 rows
    close(aggregate(LOSS, LMASK, "seq-mean-token-sum-norm"), (6 / 4 + 4 / 4 + 0) / 3)


def test_aggregate_all_empty_and_unknown():
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        close(aggregate(LOSS, torch.zeros_like(LMASK), agg), 0.0)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(LOSS, LMASK, "sum")


# ----------------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = T([-1.0]), T([-2.0])
    close(kl_estimate(logp, ref, "k1"), [1.0])
    close(kl_estimate(logp, ref, "k2"), [0.5])
    # k3: exp(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1
    close(kl_estimate(logp, ref, "k3"), [math.exp(-1)])


def test_k3_nonnegative_zero_when_equal_and_finite():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert (kl_estimate(a, b, "k3") >= 0).all()
    close(kl_estimate(a, a, "k3"), torch.zeros(1000))
    extreme = kl_estimate(T([-1000.0, 0.0]), T([0.0, -1000.0]), "k3")
    assert torch.isfinite(extreme).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(a, b, "k4")


# ----------------------------------------------------------------------------------------- PPO policy loss


def _one(ratio, adv, **kw):
    logp = torch.log(T([[ratio]])).requires_grad_(True)
    loss, stats = policy_loss(logp, T([[0.0]]), T([adv]), T([[1.0]]), **kw)
    loss.backward()
    return loss.item(), stats, logp.grad.item()


def test_policy_loss_positive_advantage_branches():
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient)
    loss, stats, grad = _one(1.5, 1.0)
    assert loss == pytest.approx(-1.2) and stats["clip_frac"].item() == 1.0 and grad == 0.0
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: d(-r)/dlogp = -r = -0.5)
    loss, stats, grad = _one(0.5, 1.0)
    assert loss == pytest.approx(-0.5) and stats["clip_frac"].item() == 0.0 and grad == pytest.approx(-0.5)


def test_policy_loss_negative_advantage_branches():
    # A=-1, r=1.5: max(1.5, 1.2) = 1.5 (unclipped)
    loss, stats, grad = _one(1.5, -1.0)
    assert loss == pytest.approx(1.5) and stats["clip_frac"].item() == 0.0 and grad == pytest.approx(1.5)
    # A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    loss, stats, grad = _one(0.5, -1.0)
    assert loss == pytest.approx(0.8) and stats["clip_frac"].item() == 1.0 and grad == 0.0


def test_policy_loss_clip_higher():
    # r=1.25, A=+1: symmetric 0.2 clips at 1.2 -> -1.2; clip_high=0.28 leaves it -> -1.25
    assert _one(1.25, 1.0)[0] == pytest.approx(-1.2)
    loss, stats, _ = _one(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and stats["clip_frac"].item() == 0.0
    # the low side still uses clip_low: r=0.75, A=-1 -> max(0.75, 0.8) = 0.8
    assert _one(0.75, -1.0, clip_low=0.2, clip_high=0.28)[0] == pytest.approx(0.8)
    # and clip_low=0.3 lets r=0.75 through: max(0.75, 0.7) = 0.75
    assert _one(0.75, -1.0, clip_low=0.3, clip_high=0.28)[0] == pytest.approx(0.75)


def test_policy_loss_dual_clip():
    # A=-1, r=5: max(5, 1.2) = 5; dual clip c=3 caps at -c*A = 3 (and the gradient is cut)
    assert _one(5.0, -1.0)[0] == pytest.approx(5.0)
    loss, stats, grad = _one(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and stats["dual_clip_frac"].item() == 1.0 and grad == 0.0
    # below the cap nothing changes: r=2 -> 2
    assert _one(2.0, -1.0, dual_clip=3.0)[0] == pytest.approx(2.0)
    # positive advantages ignore the dual clip: r=5, A=+1 -> -1.2
    assert _one(5.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        _one(1.0, 1.0, dual_clip=0.5)


def test_policy_loss_stats_by_hand():
    # two valid tokens with ratio 1.5 and 0.5, advantages per sequence [B] broadcast
    logp = torch.log(T([[1.5, 0.5, 1.0]]))
    mask = T([[1, 1, 0]])
    loss, stats = policy_loss(logp, torch.zeros(1, 3), T([1.0]), mask)
    close(loss, (-1.2 + -0.5) / 2)
    close(stats["clip_frac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    close(stats["ratio_max"], 1.5)
    # approx_kl: mean over tokens of r - ln r - 1
    close(stats["approx_kl"], ((1.5 - math.log(1.5) - 1) + (0.5 - math.log(0.5) - 1)) / 2)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_policy_loss_padding_garbage_changes_nothing():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 5, generator=g)
    old = logp + 0.3 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = T([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    pad = mask == 0
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        leaf = logp.clone().requires_grad_(True)
        base, base_stats = policy_loss(leaf, old, adv, mask, agg=agg, dual_clip=3.0)
        base.backward()
        g_base = leaf.grad.clone()
        leaf2 = logp.masked_fill(pad, NAN).requires_grad_(True)
        junk, junk_stats = policy_loss(
            leaf2, old.masked_fill(pad, -INF), adv.masked_fill(pad, NAN), mask, agg=agg, dual_clip=3.0
        )
        junk.backward()
        close(junk, base)
        close(leaf2.grad, g_base)  # finite, and zero at padding
        assert (leaf2.grad[pad] == 0).all()
        for k in base_stats:
            close(junk_stats[k], base_stats[k])


def test_policy_loss_agg_modes_differ_as_computed():
    # row0: 2 valid tokens with A=+1 at r=1 -> per-token loss -1 each; row1: 1 valid token, A=-2, r=1 -> 2
    logp, old = torch.zeros(2, 3), torch.zeros(2, 3)
    mask = T([[1, 1, 0], [1, 0, 0]])
    adv = T([1.0, -2.0])
    close(policy_loss(logp, old, adv, mask, agg="token-mean")[0], (-1 - 1 + 2) / 3)
    close(policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")[0], (-1 + 2) / 2)
    close(policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm")[0], (-2 / 3 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    # token 0: v 1.5, old 1.0, R 2.0 -> unclipped 0.25, clipped v 1.2 -> 0.64 -> 0.5 * 0.64 = 0.32 (clipped)
    # token 1: v 1.1, old 1.0, R 2.0 -> both 0.81 -> 0.405 (not clipped)
    # token 2: v 0.5, old 1.0, R 0.0 -> unclipped 0.25, clipped v 0.8 -> 0.64 -> 0.32 (clipped)
    # token 3: padding garbage
    values = T([[1.5, 1.1, 0.5, NAN]])
    old = T([[1.0, 1.0, 1.0, 1e9]])
    ret = T([[2.0, 2.0, 0.0, -1e9]])
    mask = T([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, ret, mask, clip=0.2)
    close(loss, (0.32 + 0.405 + 0.32) / 3)
    close(stats["vf_clip_frac"], 2 / 3)
    loss, stats = value_loss(values, old, ret, mask, clip=None)
    close(loss, 0.5 * (0.25 + 0.81 + 0.25) / 3)
    close(stats["vf_clip_frac"], 0.0)


def test_explained_variance_ignores_padding():
    # R [1,2,3], V [1,2,2]: resid [0,0,1] -> var 2/9 ; var R = 2/3 -> 1 - 1/3 = 2/3
    values = T([[1.0, 2.0, 2.0, 1e6]])
    returns = T([[1.0, 2.0, 3.0, -1e6]])
    mask = T([[1, 1, 1, 0]])
    close(explained_variance(values, returns, mask), 2 / 3)
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(values, T([[5.0, 5.0, 5.0, 0.0]]), mask), 0.0)  # constant returns


# ----------------------------------------------------------------------------------------- preference losses


def _grads(fn, *vals):
    leaves = [T(v, requires_grad=True) for v in vals]
    out = fn(*leaves)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def test_dpo_by_hand():
    # margin = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2; beta*margin = 1
    args = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    losses, cr, rr = dpo_loss(*args, beta=0.5)
    close(losses, [softplus(1.0)])
    close(cr, [0.5])
    close(rr, [-0.5])
    assert not cr.requires_grad
    ls, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    close(ls, [0.9 * softplus(1.0) + 0.1 * softplus(-1.0)])


def test_dpo_gradient_signs():
    _, (gc, gr, _, _) = _grads(
        lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1), [-1.0], [-3.0], [-2.0], [-2.0]
    )
    assert gc.item() < 0 and gr.item() > 0


def test_ipo_by_hand_and_gradient_signs():
    # inputs are length-averaged log-probs; target margin 1/(2*beta) = 1 at beta 0.5
    (losses, cr, rr), (gc, gr, _, _) = _grads(
        lambda a, b, c, d: ipo_loss(a, b, c, d, beta=0.5), [-2.0], [-2.0], [-2.0], [-2.0]
    )
    close(losses, [1.0])  # (0 - 1)^2
    close(cr, [0.0])  # beta * (pc - rc) = 0.5 * 0
    close(rr, [0.0])
    assert gc.item() == pytest.approx(-2.0) and gr.item() == pytest.approx(2.0)
    # margin 2 overshoots the target: (2 - 1)^2 = 1 and the gradient reverses
    (losses, _, _), (gc, gr, _, _) = _grads(
        lambda a, b, c, d: ipo_loss(a, b, c, d, beta=0.5), [-1.0], [-3.0], [-2.0], [-2.0]
    )
    close(losses, [1.0])
    assert gc.item() > 0 and gr.item() < 0


def test_kto_reference_point_and_clamp():
    # diffs [0.5, -0.5] -> mean 0 ; [2, 2] -> 2 ; [-1, -3] -> -2 clamped to 0
    close(kto_reference_point(T([-1.0, -2.0]), T([-1.5, -1.5])), 0.0)
    close(kto_reference_point(T([-1.0, -1.0]), T([-3.0, -3.0])), 2.0)
    close(kto_reference_point(T([-2.0, -4.0]), T([-1.0, -1.0])), 0.0)
    # the hook sees the local mean (-2) before the clamp: -2 + 5 = 3
    close(kto_reference_point(T([-2.0, -4.0]), T([-1.0, -1.0]), all_reduce_mean=lambda m: m + 5.0), 3.0)
    z = kto_reference_point(T([-1.0], requires_grad=True), T([-3.0]))
    assert not z.requires_grad


def test_kto_loss_by_hand():
    # r = -1 - (-2) = 1, z0 = 0.5, beta 2: desirable 1 - sigmoid(2*0.5) ; undesirable 2*(1 - sigmoid(-1))
    def sig(x):
        return 1 / (1 + math.exp(-x))

    losses, rewards = kto_loss(
        T([-1.0, -1.0]), T([-2.0, -2.0]), T([True, False]), 0.5, beta=2.0, undesirable_weight=2.0
    )
    close(losses, [1 - sig(1.0), 2 * (1 - sig(-1.0))])
    close(rewards, [2.0, 2.0])
    with pytest.raises(ValueError, match="bool"):
        kto_loss(T([-1.0]), T([-2.0]), T([1]), 0.0)


def test_kto_gradient_signs():
    _, (g, _) = _grads(
        lambda p, r: kto_loss(p, r, T([True, False]), 0.3, beta=0.1), [-1.0, -1.0], [-1.5, -1.5]
    )
    assert g[0].item() < 0  # desirable: raise its log-prob
    assert g[1].item() > 0  # undesirable: lower it


def test_kto_default_weights_rule():
    assert kto_default_weights(10, 20) == (2.0, 1.0)  # 2*10 / (1*20) = 1
    assert kto_default_weights(30, 10) == (1.0, 2.0)  # 30 / (2*10) = 1.5
    assert kto_default_weights(12, 10) == (1.0, 1.0)  # 1.2 already in band
    assert kto_default_weights(0, 5) == (1.0, 1.0)
    for nd in range(1, 40):
        for nu in range(1, 40):
            wd, wu = kto_default_weights(nd, nu)
            assert max(wd, wu) == 1.0 or min(wd, wu) == 1.0
            assert 1.0 - 1e-9 <= wd * nd / (wu * nu) <= 1.5 + 1e-9
            assert (wd == 1.0) if nd >= nu else (wu == 1.0)  # the majority keeps weight 1
    with pytest.raises(ValueError):
        kto_default_weights(-1, 3)


def test_kto_shifted_pairs():
    assert kto_shifted_pairs(3) == [1, 2, 0]
    assert kto_shifted_pairs(2) == [1, 0]
    assert all(j != i for i, j in enumerate(kto_shifted_pairs(7)))
    with pytest.raises(ValueError, match="at least 2"):
        kto_shifted_pairs(1)


def test_orpo_by_hand():
    # a_c = ln 0.5 -> odds 1 -> log odds 0 ; a_r = ln 0.2 -> odds 0.25 -> -ln 4 ; ratio ln 4
    # loss = nll - 0.1 * logsigmoid(ln 4) = 2 - 0.1 * ln(4/5)
    losses, lor = orpo_loss(T([math.log(0.5)]), T([math.log(0.2)]), T([2.0]), beta=0.1)
    close(lor, [math.log(4)])
    close(losses, [2.0 - 0.1 * math.log(0.8)])


def test_orpo_stable_and_gradient_signs():
    losses, lor = orpo_loss(T([0.0, -1e-10, -100.0]), T([-100.0, -1e-10, 0.0]), torch.zeros(3))
    assert torch.isfinite(losses).all() and torch.isfinite(lor).all()
    (_, _), (gc, gr, gn) = _grads(lambda c, r, n: orpo_loss(c, r, n), [-0.7], [-1.2], [0.7])
    assert gc.item() < 0 and gr.item() > 0 and gn.item() == pytest.approx(1.0)
    # bf16 inputs are upcast
    losses, _ = orpo_loss(T([-0.7]).bfloat16(), T([-1.2]).bfloat16(), T([0.7]).bfloat16())
    assert losses.dtype == torch.float32


def test_pairwise_reward_loss_by_hand():
    close(pairwise_reward_loss(T([2.0]), T([1.0])), [softplus(1.0)])
    close(pairwise_reward_loss(T([2.0]), T([1.0]), margin=T([1.0])), [math.log(2)])
    _, (gc, gr) = _grads(pairwise_reward_loss, [0.3], [0.1])
    assert gc.item() < 0 and gr.item() > 0


def test_offline_binary_ppo_loss_by_hand():
    # row0 (+1): ratios 1.5 -> max(-1.5, -1.2) = -1.2 ; 0.5 -> max(-0.5, -0.8) = -0.5 ; mean -0.85
    # row1 (-1): ratio 1.5 -> max(1.5, 1.2) = 1.5 ; second token is padding garbage
    logp = torch.log(T([[1.5, 0.5], [1.5, 1e10]]))
    mask = T([[1, 1], [1, 0]])
    close(offline_binary_ppo_loss(logp, torch.zeros(2, 2), T([1.0, -1.0]), mask), [-0.85, 1.5])
    with pytest.raises(ValueError, match=r"\+1 \(good\) and -1 \(bad\)"):
        offline_binary_ppo_loss(logp, torch.zeros(2, 2), T([1.0, 0.5]), mask)
