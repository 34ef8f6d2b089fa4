"""Advantage estimators (and the KL shaping and controllers they use) against values worked out by
hand in each test; every estimator is reached through the registry as the online loop reaches it."""

import math
import statistics

import pytest
import torch

from fleetrl.algos import ADVANTAGE_ESTIMATORS, ONLINE_ALGORITHMS
from fleetrl.algos.advantages import grpo_advantages, rloo_advantages
from fleetrl.algos.kl import AdaptiveKLController, FixedKLController
from fleetrl.algos.reduce import masked_whiten
from fleetrl.algos.shaping import sequence_rewards_with_kl, token_rewards_with_kl
from fleetrl.algos.token_advantages import discounted_returns as reinforce_pp_returns
from fleetrl.algos.token_advantages import gae


def reinforce_pp_advantages(scores, kl, mask, kl_coef, gamma=1.0):
    return ADVANTAGE_ESTIMATORS.get("reinforce_pp")(scores, mask, kl=kl, kl_coef=kl_coef, gamma=gamma)[0]


def reinforce_pp_baseline_advantages(scores, group_size, kl, mask, kl_coef, gamma=1.0):
    estimator = ADVANTAGE_ESTIMATORS.get("reinforce_pp_baseline")
    return estimator(scores, mask, kl=kl, kl_coef=kl_coef, group_size=group_size, gamma=gamma)[0]


T = torch.tensor


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0
    )


# --------------------------------------------------------------------------------------------- GRPO


REWARDS = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts x 4 samples


def test_grpo_group_scale_by_hand():
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    # group 2: all equal -> centered 0, std 0 -> 0 / (0 + eps) = 0
    s = math.sqrt(1 / 3)
    a = 0.5 / (s + 1e-6)
    close(grpo_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_batch_scale_by_hand():
    # batch mean 10/8 = 1.25; squared deviations 0.0625, 1.5625, 1.5625, 0.0625, 0.5625 x4 -> 5.5
    # unbiased var 5.5/7; the centering is still per group
    std = math.sqrt(5.5 / 7)
    c = 0.5 / (std + 1e-6)
    close(grpo_advantages(REWARDS, 4, scale="batch"), [c, -c, -c, c, 0, 0, 0, 0])


def test_drgrpo_no_scaling():
    close(grpo_advantages(REWARDS, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(ADVANTAGE_ESTIMATORS.get("drgrpo")(REWARDS, 4), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(ADVANTAGE_ESTIMATORS.get("grpo")(REWARDS, 4), grpo_advantages(REWARDS, 4))


def test_grpo_group_of_three():
    # [3, 1, 2]: mean 2, unbiased var (1 + 1 + 0) / 2 = 1 -> std 1
    close(grpo_advantages(T([3.0, 1.0, 2.0]), 3, eps=0.0), [1.0, -1.0, 0.0])


def test_grpo_group_size_one_gives_zero_not_nan():
    out = grpo_advantages(T([1.0, 5.0, -3.0]), 1)
    close(out, [0.0, 0.0, 0.0])
    close(grpo_advantages(T([7.0]), 1, scale="batch"), [0.0])


def test_grpo_validation_errors():
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        grpo_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="group, batch, none"):
        grpo_advantages(torch.zeros(8), 4, scale="per-token")
    with pytest.raises(ValueError, match="flat"):
        grpo_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), 0)


# --------------------------------------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_by_hand():
    # [1,0,0,1]: 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3 ; [2,2,2,2] -> 0
    close(rloo_advantages(REWARDS, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # [3,1,2]: 3 - 1.5 = 1.5 ; 1 - 2.5 = -1.5 ; 2 - 2 = 0
    close(rloo_advantages(T([3.0, 1.0, 2.0]), 3), [1.5, -1.5, 0.0])
    close(ADVANTAGE_ESTIMATORS.get("rloo")(T([3.0, 1.0, 2.0]), 3), [1.5, -1.5, 0.0])


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        rloo_advantages(T([1.0, 2.0]), 1)


# --------------------------------------------------------------------------------------------- GAE

G, L = 0.9, 0.8


def _gae_hand():
    # valid tokens: r = [0, 0, 1], V = [0.5, 0.6, 0.7]; V after the last token is 0
    d2 = 1 + G * 0 - 0.7  # 0.3
    a2 = d2
    d1 = 0 + G * 0.7 - 0.6  # 0.03
    a1 = d1 + G * L * a2  # 0.246
    d0 = 0 + G * 0.6 - 0.5  # 0.04
    a0 = d0 + G * L * a1  # 0.21712
    return [a0, a1, a2], [a0 + 0.5, a1 + 0.6, a2 + 0.7]


def test_gae_right_and_left_padding_by_hand():
    (a0, a1, a2), (r0, r1, r2) = _gae_hand()
    assert abs(a0 - 0.21712) < 1e-9
    rewards = T([[0.0, 0.0, 1.0, 99.0], [77.0, 0.0, 0.0, 1.0]])
    values = T([[0.5, 0.6, 0.7, 42.0], [13.0, 0.5, 0.6, 0.7]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=G, lam=L)
    close(adv, [[a0, a1, a2, 0], [0, a0, a1, a2]])
    close(ret, [[r0, r1, r2, 0], [0, r0, r1, r2]])


def test_gae_padding_garbage_does_not_leak():
    rewards = T([[0.0, 0.0, 1.0, 0.0]])
    values = T([[0.5, 0.6, 0.7, 0.0]])
    mask = T([[1, 1, 1, 0]])
    base = gae(rewards, values, mask, G, L)
    junk = gae(T([[0.0, 0.0, 1.0, float("nan")]]), T([[0.5, 0.6, 0.7, 1e30]]), mask, G, L)
    for x, y in zip(base, junk):
        close(y, x)


def test_gae_gamma_lambda_one_is_return_minus_value():
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    adv, ret = gae(T([[0.0, 0.0, 2.0]]), T([[1.0, 0.5, 0.25]]), torch.ones(1, 3))
    close(adv, [[1.0, 1.5, 1.75]])
    close(ret, [[2.0, 2.0, 2.0]])


def test_gae_shape_error():
    with pytest.raises(ValueError, match="values has shape"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_returns_by_hand():
    # gamma 0.5: G2 = 1 ; G1 = 0.2 + 0.5*1 = 0.7 ; G0 = 0.1 + 0.5*0.7 = 0.45
    r = T([[0.1, 0.2, 1.0, 123.0], [5.0, 0.1, 0.2, 1.0]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    close(reinforce_pp_returns(r, mask, gamma=0.5), [[0.45, 0.7, 1.0, 0.0], [0.0, 0.45, 0.7, 1.0]])


def test_masked_whiten_by_hand():
    x = T([[1.0, 2.0, 3.0, 1e6], [float("nan"), 4.0, -7.0, 9.0]])
    mask = T([[1, 1, 1, 0], [0, 1, 0, 0]])
    # valid 1,2,3,4: mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3
    s = math.sqrt(5 / 3 + 1e-8)
    w = [(v - 2.5) / s for v in (1, 2, 3, 4)]
    close(masked_whiten(x, mask), [[w[0], w[1], w[2], 0], [0, w[3], 0, 0]])
    close(
        masked_whiten(x, mask, shift_mean=False),
        [[w[0] + 2.5, w[1] + 2.5, w[2] + 2.5, 0], [0, w[3] + 2.5, 0, 0]],
    )


def test_token_rewards_with_kl_by_hand():
    scores = T([2.0, -1.0])
    kl = T([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    out = token_rewards_with_kl(scores, kl, mask, kl_coef=0.1)
    close(out, [[-0.01, -0.02, -0.03 + 2.0, 0.0], [0.0, -0.05, -0.05, -0.05 - 1.0]])


def test_sequence_rewards_are_the_token_rewards_summed():
    # Group algorithms, kl_in: reward: score - 0.1 * sum(kl over valid tokens); padding's 9.0 never counts.
    scores = T([2.0, -1.0])
    kl = T([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1, 0], [0, 1, 1, 1]])
    close(sequence_rewards_with_kl(scores, kl, mask, 0.1), [2.0 - 0.06, -1.0 - 0.15])
    per_token = token_rewards_with_kl(scores, kl, mask, 0.1)
    close(sequence_rewards_with_kl(scores, kl, mask, 0.1), per_token.sum(-1))
    # An empty completion pays nothing (no error: group algorithms have no last token to find).
    close(sequence_rewards_with_kl(T([1.0]), T([[float("nan")]]), T([[0]]), 0.1), [1.0])


def test_token_rewards_with_kl_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid token"):
        token_rewards_with_kl(T([1.0, 1.0]), torch.zeros(2, 3), T([[1, 0, 0], [0, 0, 0]]), 0.1)


def _whiten_list(values):
    m, s = statistics.mean(values), statistics.stdev(values)  # stdev is the unbiased one
    return [(v - m) / s for v in values]


KL = T([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 0.5]])
MASK = T([[1, 1, 1, 0], [0, 1, 1, 1]])


def test_reinforce_pp_advantages_by_hand():
    # token rewards (kl_coef 0.1): row0 [-0.01, -0.02, 1.97], row1 [-0.05, -0.05, -1.05]
    # returns-to-go, gamma 1: row0 [1.94, 1.95, 1.97], row1 [-1.15, -1.10, -1.05]
    w = _whiten_list([1.94, 1.95, 1.97, -1.15, -1.10, -1.05])
    out = reinforce_pp_advantages(T([2.0, -1.0]), KL, MASK, kl_coef=0.1)
    close(out, [[w[0], w[1], w[2], 0], [0, w[3], w[4], w[5]]])


def test_reinforce_pp_returns_the_returns_it_whitens():
    adv, returns = ADVANTAGE_ESTIMATORS.get("reinforce_pp")(T([2.0, -1.0]), MASK, kl=KL, kl_coef=0.1)
    close(returns, [[1.94, 1.95, 1.97, 0], [0, -1.15, -1.10, -1.05]])
    close(adv, masked_whiten(returns, MASK))


def test_gae_estimator_shapes_the_rewards_and_needs_values():
    # score 1 on the last token, kl 0.5 at coef 0.2 -> token rewards [-0.1, 0.9]; values [0.5, 0.25]
    # gamma = lam = 1: A_1 = 0.9 - 0.25 = 0.65, A_0 = -0.1 + 0.25 - 0.5 + 0.65 = 0.3; returns = A + V
    estimator = ADVANTAGE_ESTIMATORS.get("gae")
    adv, ret = estimator(T([1.0]), T([[1, 1]]), kl=T([[0.5, 0.5]]), kl_coef=0.2, values=T([[0.5, 0.25]]))
    close(adv, [[0.3, 0.65]])
    close(ret, [[0.8, 0.9]])
    with pytest.raises(ValueError, match="values"):
        estimator(T([1.0]), T([[1, 1]]), kl=T([[0.5, 0.5]]), kl_coef=0.2)


def test_every_online_algorithm_is_declared_with_registered_pieces():
    kinds = {name: ONLINE_ALGORITHMS.get(name) for name in ONLINE_ALGORITHMS}
    assert {"grpo", "drgrpo", "rloo", "gspo", "cispo", "ppo", "reinforce_pp", "reinforce_pp_baseline"} \
        <= set(kinds)
    assert {n for n, a in kinds.items() if a.per_token} >= {"ppo", "reinforce_pp", "reinforce_pp_baseline"}
    assert [n for n, a in kinds.items() if a.critic] == ["ppo"]
    assert [kinds[n].min_group_size for n in ("rloo", "reinforce_pp_baseline", "grpo", "drgrpo", "ppo")] \
        == [2, 2, 2, 2, 1]
    with pytest.raises(KeyError, match="did you mean 'rloo'"):
        ADVANTAGE_ESTIMATORS.get("rlo")


def test_reinforce_pp_baseline_subtracts_group_mean():
    # scores [3, 1] in one group of 2 -> centered [1, -1]
    # token rewards: row0 [-0.01, -0.02, -0.03 + 1], row1 [-0.05, -0.05, -0.05 - 1]
    # returns-to-go: row0 [0.94, 0.95, 0.97], row1 [-1.15, -1.10, -1.05]
    w = _whiten_list([0.94, 0.95, 0.97, -1.15, -1.10, -1.05])
    out = reinforce_pp_baseline_advantages(T([3.0, 1.0]), 2, KL, MASK, kl_coef=0.1)
    close(out, [[w[0], w[1], w[2], 0], [0, w[3], w[4], w[5]]])


# --------------------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 9: error 9/6 - 1 = 0.5 -> clipped to 0.2; factor 1 + 0.2 * 256 / 10000 = 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    assert c.value == pytest.approx(0.100512)
    # kl 6.6: error 0.1 (inside the clip); factor 1.00256
    c2 = AdaptiveKLController(0.1, 6.0, 10000)
    c2.update(6.6, 256)
    assert c2.value == pytest.approx(0.1 * 1.00256)
    # kl 3: error -0.5 -> -0.2; factor 1 - 0.00512
    c3 = AdaptiveKLController(0.1, 6.0, 10000)
    c3.update(3.0, 256)
    assert c3.value == pytest.approx(0.1 * (1 - 0.00512))


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05


def test_gae_and_returns_pass_over_observation_tokens_by_hand():
    """Episode row [p0, p1, obs, obs, p2, pad]: t+1 of p1 is p2; padding still resets."""
    from fleetrl.algos.token_advantages import discounted_returns, gae

    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    skip = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.0, 0.0, 9.0, 9.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 100.0, 100.0, 0.4, 100.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, skip=skip)
    # t=4: 1 - 0.4 = 0.6; t=1: 0.9*0.4 - 0.2 + 0.72*0.6 = 0.592; t=0: 0.9*0.2 - 0.5 + 0.72*0.592
    expected = torch.tensor([[0.10624, 0.592, 0.0, 0.0, 0.6, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.60624, 0.792, 0.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    # Without skip the observation is a reset (right only for padding): p1 then bootstraps from 0.
    adv_reset, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.isclose(adv_reset[0, 1], torch.tensor(-0.2))
    g = discounted_returns(rewards, mask, gamma=0.9, skip=skip)
    assert torch.allclose(g, torch.tensor([[0.81, 0.9, 0.0, 0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="observation mask must share"):
        gae(rewards, values, mask, skip=skip[:, :3])


def test_token_estimators_take_the_observation_mask():
    from fleetrl.algos.registry import ADVANTAGE_ESTIMATORS

    mask = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    skip = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    kl = torch.zeros(2, 4)
    _, ret = ADVANTAGE_ESTIMATORS.get("reinforce_pp_baseline")(
        torch.tensor([1.0, 0.0]), mask, kl=kl, kl_coef=0.0, group_size=2, gamma=1.0, skip=skip)
    # The first turn's token gets the episode's (centered) score through the observation.
    assert torch.allclose(ret, torch.tensor([[0.5, 0.0, 0.0, 0.5], [-0.5, -0.5, -0.5, -0.5]]))
