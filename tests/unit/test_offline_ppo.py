"""Offline PPO with binary rewards: the per-example losses and statistics by hand, the learner's
wiring (token log-probs, reference as the old policy, mask, signs, weights) against the pure loss on
a tiny model, and the driver's precomputed old log-probs lined up with each training batch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fleetrl.algos.logprobs import token_logprobs
from fleetrl.algos.preference import offline_binary_ppo_loss
from fleetrl.algos.reduce import masked_sum
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.objective import LocalModels
from fleetrl.learner.offline import OfflinePPOObjective, offline_ppo_losses
from fleetrl.offline.loop import OfflineRun, place_token_values
from fleetrl.run.config import config_from_dict
from fleetrl.run.runtime import RunDir
from fleetrl.testing.tasks import preference_task, unpaired_task, write_jsonl
from tests.unit.test_offline_run import CharTokenizer, FakeLearner

T = torch.tensor


def test_offline_ppo_losses_and_statistics_by_hand():
    # Example 0 (desirable): token log ratios +0.5 and -0.1 -> ratios e^0.5 = 1.6487 (clipped to 1.2:
    # the clipped term max(-1.6487, -1.2) = -1.2 is active) and e^-0.1 = 0.9048 (unclipped: -0.9048).
    # Example 1 (undesirable): log ratio -0.5 on its one valid token -> ratio 0.6065, clipped to 0.8:
    # max(0.6065, 0.8) = 0.8 (clipped term active); its second token is padding.
    old = T([[-1.0, -2.0], [-1.5, -3.0]])
    logp = old + T([[0.5, -0.1], [-0.5, 7.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    losses, stats = offline_ppo_losses(logp, old, T([True, False]), mask, clip=0.2)
    torch.testing.assert_close(losses, T([(-1.2 - math.exp(-0.1)) / 2, 0.8]))
    torch.testing.assert_close(stats["rewards"], T([0.4, -0.5]))  # summed log ratios over valid tokens
    torch.testing.assert_close(stats["clip_frac"], T([0.5, 1.0]))
    # Same numbers as the pure loss with rewards +1 / -1 (the wiring adds nothing of its own).
    torch.testing.assert_close(losses, offline_binary_ppo_loss(logp, old, T([1.0, -1.0]), mask, 0.2))


def test_offline_ppo_gradient_raises_desirable_and_lowers_undesirable_tokens_until_clipped():
    old = torch.zeros(2, 3)
    delta = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, -0.5]], requires_grad=True)
    losses, _ = offline_ppo_losses(old + delta, old, T([True, False]), torch.ones(2, 3))
    losses.sum().backward()
    g = delta.grad
    assert (g[0, :2] < 0).all() and (g[1, :2] > 0).all()  # descent raises good tokens, lowers bad ones
    assert g[0, 2] == 0 and g[1, 2] == 0  # ratios outside [0.8, 1.2] in the rewarded direction: clipped
    with pytest.raises(ValueError, match="bool"):
        offline_ppo_losses(old, old, T([1, 0]), torch.ones(2, 3))


def tiny_lm(seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      initializer_range=0.3)  # large weights: ratios far from 1, some clipped
    return Qwen2ForCausalLM(cfg).float().eval()


def objective(policy, reference, clip: float = 0.2) -> OfflinePPOObjective:
    """The offline PPO objective over plain modules (no DeepSpeed): its per-micro-batch loss is what
    this test pins; the learner rank runs the same object over its engine."""
    return OfflinePPOObjective(LocalModels(policy, reference), options={"clip": clip}, name="offline_ppo")


def ppo_batch() -> dict[str, torch.Tensor]:
    # Right-padded rows: prompt tokens then completion tokens (loss_mask), different lengths.
    ids = T([[5, 6, 7, 8, 9, 0], [5, 11, 12, 13, 0, 0], [7, 8, 20, 21, 22, 23]])
    attn = T([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = T([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss,
            "desirable": T([True, False, True]), "weight": T([1.0, 2.0, 0.5])}


def hf_token_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logprobs(logits, batch["input_ids"])


@pytest.mark.parametrize("precomputed", [False, True])
def test_learner_micro_loss_is_the_pure_loss_on_the_models_token_logps(precomputed):
    policy, reference = tiny_lm(0), tiny_lm(1)
    batch = ppo_batch()
    if precomputed:  # the driver's old_logprobs replace the reference's forward
        with torch.no_grad():
            batch["old_logprobs"] = hf_token_logps(reference, batch)
        reference = None
    obj = objective(policy, reference)
    stats = Stats()
    loss = obj.loss(batch, stats)
    assert obj.units(batch) == 3.0  # one unit per example

    mask = (batch["loss_mask"] * batch["attention_mask"]).float()
    logp = hf_token_logps(policy, batch)
    with torch.no_grad():
        old = hf_token_logps(tiny_lm(1), batch)
    expected = offline_binary_ppo_loss(logp, old, T([1.0, -1.0, 1.0]), mask) * batch["weight"]
    torch.testing.assert_close(loss, expected.mean(), atol=1e-5, rtol=1e-5)
    out = obj.finish(stats.reduce(lambda t, op="sum": t))
    assert out["num_tokens"] == float(batch["attention_mask"].sum())
    ratio = masked_sum(logp - old, mask, dim=-1).detach()
    assert out["rewards/chosen"] == pytest.approx(float((ratio[0] + ratio[2]) / 2), abs=1e-5)
    assert out["rewards/rejected"] == pytest.approx(float(ratio[1]), abs=1e-5)
    assert out["loss"] == pytest.approx(float(expected.detach().mean()), abs=1e-5)
    assert 0.0 < out["clip_frac"] < 1.0
    # The gradient of the micro-batch loss is the hand-built one's.
    loss.backward()
    g = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    expected.mean().backward()
    for a, b in zip(g, [p.grad for p in policy.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_place_token_values_writes_each_rows_values_at_its_mask():
    mask = T([[0, 1, 1, 0], [0, 0, 1, 1]])
    out = place_token_values([T([1.0, 2.0]), T([3.0, 4.0])], mask)
    torch.testing.assert_close(out, T([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 4.0]]))
    with pytest.raises(ValueError, match="row 1"):
        place_token_values([T([1.0, 2.0]), T([3.0])], mask)


class TokenFakeLearner(FakeLearner):
    """FakeLearner plus per-token log-probs (what offline PPO's precompute asks for)."""

    def compute_logprobs(self, rows, which="policy"):
        self.log.append(f"tokens:{which}")
        assert not (which == "reference" and self.released)
        m = (rows["loss_mask"] * rows["attention_mask"]).float()
        return -rows["input_ids"].float() * m / 1000  # a function of the token only


def test_driver_precomputes_old_logprobs_once_and_lines_them_up_with_every_batch(tmp_path):
    write_jsonl(unpaired_task(40, seed=1), tmp_path / "train.jsonl")
    write_jsonl(preference_task(8, seed=2), tmp_path / "eval.jsonl")
    cfg = config_from_dict({
        "algorithm": "offline_ppo", "run": {"output_dir": str(tmp_path / "runs"), "name": "ppo", "steps": 4},
        "data": {"path": str(tmp_path / "train.jsonl")}, "eval_data": {"path": str(tmp_path / "eval.jsonl")},
        "offline": {"batch_size": 8, "max_length": 64}, "learner": {"micro_batch_size": 4},
    })
    run = OfflineRun(cfg, RunDir(cfg), CharTokenizer())
    fake = TokenFakeLearner("offline_ppo")
    run.run(fake)
    assert fake.log.count("tokens:reference") == 1 and fake.log.index("release") < fake.log.index("train")
    assert "kl_reference" not in fake.log
    for batch in fake.batches:
        m = (batch["loss_mask"] * batch["attention_mask"]).float()
        torch.testing.assert_close(batch["old_logprobs"], -batch["input_ids"].float() * m / 1000)
        assert batch["desirable"].any() and (~batch["desirable"]).any()
    rows = [json.loads(line) for line in run.run_dir.metrics_path.read_text().splitlines()]
    assert rows[0]["eval/accuracy"] == 0.0  # policy == reference before training
    # Held-out pairs are scored with the beta-free implicit reward log(policy / reference): the fake
    # raises every one-letter run, so chosen answers gain (and rejected runs of another letter too).
    assert rows[-1]["eval/rewards/margins"] > 0 and rows[-1]["eval/accuracy"] >= 0.5
    assert run.learner_kwargs()["algo_cfg"]["clip"] == 0.2


def test_offline_ppo_on_the_fly_sends_no_old_logprobs_and_config_rules(tmp_path):
    write_jsonl(unpaired_task(16, seed=1), tmp_path / "train.jsonl")
    base = {"algorithm": "offline_ppo",
            "run": {"output_dir": str(tmp_path / "runs"), "name": "otf", "steps": 1},
            "data": {"path": str(tmp_path / "train.jsonl")},
            "offline": {"batch_size": 8, "max_length": 64, "reference_logps": "on_the_fly"},
            "learner": {"micro_batch_size": 4}}
    cfg = config_from_dict(base)
    run = OfflineRun(cfg, RunDir(cfg), CharTokenizer())
    fake = TokenFakeLearner("offline_ppo")
    run.run(fake)
    assert "old_logprobs" not in fake.batches[0] and "release" not in fake.log
    with pytest.raises(ValueError, match="learner.reference"):
        config_from_dict({**base,
                          "learner": {"micro_batch_size": 4, "reference": False, "loss": {"kl_coef": 0}}})
    with pytest.raises(ValueError, match="offline_ppo.clip"):
        config_from_dict({**base, "offline_ppo": {"clip": 1.5}})
