"""Pure pieces of the offline learner: KTO's mismatched pairs, the per-pair losses and statistics,
and the exact reduction of statistics over micro-batches and ranks (no DeepSpeed here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fleetrl.algos.preference import dpo_loss, kto_reference_point, orpo_loss
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.offline import (
    algorithm_config,
    kto_mismatched_rows,
    pad_to_width,
    preference_losses,
    reward_model_losses,
)
from fleetrl.learner.offline_config import KTOConfig


def rows(prompts: list[list[int]], completions: list[list[int]], width: int = 8):
    """Right-padded rows (pad id 0): prompt then completion, loss mask on the completion."""
    n = len(prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    lm = torch.zeros(n, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        lm[i, len(p) : len(p) + len(c)] = 1
    return ids, attn, lm


def test_kto_pairs_each_prompt_with_the_next_examples_completion():
    prompts = [[11, 12], [21], [31, 32, 33]]
    completions = [[13], [22, 23, 24], [34, 35]]
    out = kto_mismatched_rows(*rows(prompts, completions), pad_token_id=0)
    # (x_0, y_1), (x_1, y_2), (x_2, y_0): shifted by one, wrapping around.
    assert out["input_ids"].tolist() == [[11, 12, 22, 23, 24], [21, 34, 35, 0, 0], [31, 32, 33, 13, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert out["attention_mask"].sum(-1).tolist() == [5, 3, 4]
    # No row is its own example's completion.
    for i in range(3):
        assert out["input_ids"][i].tolist()[len(prompts[i]):][: len(completions[i])] != completions[i]


def test_kto_pairs_respect_max_length_and_refuse_a_single_example():
    out = kto_mismatched_rows(*rows([[1, 2, 3], [4]], [[5], [6, 7, 8, 9]]), pad_token_id=0, max_length=4)
    assert out["input_ids"][0].tolist() == [1, 2, 3, 6]  # the borrowed completion is cut to fit
    assert out["input_ids"][1].tolist() == [4, 5, 0, 0]
    with pytest.raises(ValueError, match="at least 2 examples per micro-batch"):
        kto_mismatched_rows(*rows([[1]], [[2]]))


def test_kto_reference_point_from_mismatched_pairs_is_all_reduced_then_clamped():
    policy, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])  # log ratios +1, -1: mean 0
    assert float(kto_reference_point(policy, ref)) == 0.0
    # Another rank saw mean 2: the all-reduced mean is 1 on every rank.
    z0 = kto_reference_point(policy, ref, all_reduce_mean=lambda t: (t + 2.0) / 2)
    assert float(z0) == 1.0
    assert float(kto_reference_point(policy, ref, all_reduce_mean=lambda t: (t - 4.0) / 2)) == 0.0  # clamp


def test_dpo_statistics_match_the_loss_and_the_rewards_by_hand():
    pc, pr = torch.tensor([-10.0, -8.0], requires_grad=True), torch.tensor([-12.0, -7.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -8.0]), torch.tensor([-11.0, -8.0])
    n = torch.tensor([5.0, 4.0])
    losses, st = preference_losses("dpo", {"beta": 0.5}, pc, pr, n, n, rc, rr)
    expected, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(st["rewards/chosen"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(st["rewards/rejected"], torch.tensor([-0.5, 0.5]))
    assert st["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert st["logps/chosen"].tolist() == [-10.0, -8.0]
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    with pytest.raises(ValueError, match="needs the reference"):
        preference_losses("dpo", {}, pc, pr, n, n)


def test_ipo_uses_length_averaged_log_probs():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -10.0, -10.0))
    nc, nr = torch.tensor([5.0]), torch.tensor([4.0])
    losses, st = preference_losses("ipo", {"beta": 0.25}, pc, pr, nc, nr, rc, rr)
    margin = (-10 / 5 - -10 / 5) - (-12 / 4 - -10 / 4)  # 0.5
    assert losses.item() == pytest.approx((margin - 1 / (2 * 0.25)) ** 2)
    assert st["rewards/rejected"].item() == pytest.approx(0.25 * (-12 / 4 + 10 / 4))


def test_orpo_terms_add_up_and_have_no_reference():
    pc, pr = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -2.0])
    nc, nr = torch.tensor([3.0, 2.0]), torch.tensor([3.0, 1.0])
    losses, st = preference_losses("orpo", {"beta": 0.2}, pc, pr, nc, nr)
    expected, log_odds = orpo_loss(pc / nc, pr / nr, -pc / nc, beta=0.2)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(st["orpo/nll"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(st["orpo/nll"] + st["orpo/or_loss"], losses)
    torch.testing.assert_close(st["orpo/log_odds_ratio"], log_odds)
    torch.testing.assert_close(st["rewards/chosen"], 0.2 * pc / nc)  # ORPO's reward: beta * mean log-prob
    assert st["rewards/accuracies"].tolist() == [1.0, 1.0]


def test_reward_model_losses_and_accuracy():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    losses, st = reward_model_losses(c, r)
    torch.testing.assert_close(losses, -F.logsigmoid(c - r))
    assert st["scores/accuracies"].tolist() == [1.0, 0.0] and st["scores/margins"].tolist() == [1.0, -1.0]
    with_margin, _ = reward_model_losses(c, r, torch.tensor([1.0, 0.0]))
    assert with_margin[0].item() == pytest.approx(math.log(2.0))


def test_stat_sums_reduce_to_global_means_over_ranks():
    a, b = Stats(), Stats()  # two ranks, each one micro-batch
    for s, loss, chosen, select, tokens, peak in ((a, [1.0, 3.0], [4.0, 8.0], [True, False], 10, 1.5),
                                                  (b, [5.0, 7.0], [0.0, 2.0], [False, True], 6, 2.5)):
        s.examples({"loss": torch.tensor(loss)})
        s.examples({"rewards/chosen": torch.tensor(chosen)}, select=torch.tensor(select))
        s.sum("num_tokens", tokens)
        s.max("ratio_max", peak)

    def all_reduce(t, op="sum"):  # what an all-reduce over the two ranks returns (b's tensor built alike)
        flat_b = [v for k in sorted(b.means) for v in b.means[k]] + [b.sums[k] for k in sorted(b.sums)]
        if op == "max":
            return torch.maximum(t, torch.tensor([b.maxes[k] for k in sorted(b.maxes)], dtype=torch.float64))
        return t + torch.tensor(flat_b, dtype=torch.float64)

    out = a.reduce(all_reduce)
    assert out == {"loss": 4.0, "rewards/chosen": 3.0, "num_tokens": 16.0, "ratio_max": 2.5}
    empty = Stats()
    empty.mean("kl", 0.0, 0.0)
    empty.mean("clip_frac", 0.0, 0.0, empty=0.0)
    reduced = empty.reduce(lambda t, op="sum": t)
    assert math.isnan(reduced["kl"]) and reduced["clip_frac"] == 0.0


def test_algorithm_config_validates_and_pad_to_width():
    assert algorithm_config("kto", {"beta": 0.2}) == KTOConfig(beta=0.2)
    with pytest.raises(ValueError, match="unknown offline algorithm 'ppo'"):
        algorithm_config("ppo", {})
    with pytest.raises(ValueError, match="set both kto.desirable_weight and kto.undesirable_weight"):
        algorithm_config("kto", {"desirable_weight": 2.0})
    out = pad_to_width({"input_ids": torch.ones(1, 2, dtype=torch.long), "loss_mask": torch.ones(1, 2)}, 4, 9)
    assert out["input_ids"].tolist() == [[1, 1, 9, 9]] and out["loss_mask"].tolist() == [[1, 1, 0, 0]]


def test_every_offline_algorithm_has_an_objective_that_agrees_with_the_config_table():
    from fleetrl.learner.config import LearnerConfig
    from fleetrl.learner.offline_config import OFFLINE_ALGORITHMS, REFERENCE_ALGORITHMS
    from fleetrl.learner.rank import objective_class

    for name in OFFLINE_ALGORITHMS:
        cls = objective_class(name)
        assert cls.needs_reference(name, LearnerConfig()) == (name in REFERENCE_ALGORITHMS), name
        assert (cls.reference_inputs(name) is not None) == (name in REFERENCE_ALGORITHMS), name
    with pytest.raises(KeyError, match="did you mean 'simpo'"):
        objective_class("simpoo")
