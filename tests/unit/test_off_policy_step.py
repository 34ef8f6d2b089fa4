"""The decoupled-PPO rewrite of a rollout batch (online/off_policy.py), with a stand-in learner."""

import math
from pathlib import Path

import pytest
import torch

from fleetrl.online.batch import Sample, pad_samples
from fleetrl.online.off_policy import OffPolicyCorrection
from fleetrl.run.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


class FixedLearner:
    """Answers compute_logprobs with given log-probs (the learner's, before the update)."""

    def __init__(self, logprobs: torch.Tensor):
        self.logprobs = logprobs
        self.calls = 0

    def compute_logprobs(self, batch, which="policy", temperature=1.0):
        assert which == "policy"
        self.calls += 1
        return self.logprobs.clone()


def _batch():
    # Two samples of prompt [1, 2]: completions of 2 and 1 tokens; the sampler's log-probs.
    samples = [Sample(0, "", [1, 2], [3, 4], [-1.0, -2.0], "stop", weight_version=4),
               Sample(0, "", [1, 2], [5], [-1.0], "stop", weight_version=3, last_weight_version=4)]
    return samples, pad_samples(samples, pad_id=0)


def test_truncated_correction_rewrites_ratio_base_and_weights_advantages():
    # Two optimizer steps per batch: the proximal log-probs come from a separate pass.
    cfg = load_config(EXAMPLE, ["learner.loss.importance_sampling.cap=2.0", "rl.mini_batch_size=64"])
    samples, batch = _batch()
    # Learner log-probs per position (columns 2, 3 are the completion tokens): w = exp(prox - mu).
    prox = torch.tensor([[0.0, 0.0, -1.0 + math.log(3.0), -2.0],     # w = 3 (truncated to 2), 1
                         [0.0, 0.0, -1.0 + math.log(0.5), 9.9]])     # w = 0.5; column 3 is padding
    learner = FixedLearner(prox)
    batch["advantages"] = torch.tensor([1.0, -2.0])
    metrics = OffPolicyCorrection(cfg, learner)(batch, samples, learner_version=4)

    assert learner.calls == 1
    assert torch.allclose(batch["advantages"], torch.tensor([[0, 0, 2.0, 1.0], [0, 0, -1.0, 0]]))
    assert torch.allclose(batch["old_logprobs"], prox * torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]))
    assert metrics["is/truncated_frac"] == pytest.approx(1 / 3)
    assert metrics["is/weight_max"] == pytest.approx(3.0)
    # Mismatch only over the first sample: sampled with version 4, the learner's, no update in flight.
    assert metrics["mismatch/tokens"] == 2
    assert metrics["mismatch/abs_logp_diff"] == pytest.approx(math.log(3.0) / 2)


def test_masked_correction_drops_tokens_outside_the_range():
    cfg = load_config(EXAMPLE, ["learner.loss.importance_sampling.mode=mask", "rl.epochs=2"])
    samples, batch = _batch()
    prox = torch.tensor([[0.0, 0.0, -1.0 + math.log(3.0), -2.0], [0.0, 0.0, -1.0 + math.log(0.6), 0.0]])
    batch["advantages"] = torch.tensor([1.0, 1.0])
    metrics = OffPolicyCorrection(cfg, FixedLearner(prox))(batch, samples, learner_version=5)
    assert torch.allclose(batch["advantages"], torch.tensor([[0, 0, 0.0, 1.0], [0, 0, 0.6, 0]]))
    assert metrics["is/masked_frac"] == pytest.approx(1 / 3)
    assert "mismatch/abs_logp_diff" not in metrics  # no sample came from version 5


def test_off_mode_leaves_the_batch_and_skips_the_pass():
    cfg = load_config(EXAMPLE, ["learner.loss.importance_sampling.mode=off"])
    samples, batch = _batch()
    batch["advantages"] = torch.tensor([1.0, -1.0])
    before = {k: v.clone() for k, v in batch.items()}
    learner = FixedLearner(torch.zeros(2, 4))
    assert OffPolicyCorrection(cfg, learner)(batch, samples, learner_version=4) == {}
    assert learner.calls == 0
    assert all(torch.equal(before[k], batch[k]) for k in before)


def test_a_bad_mask_range_names_the_key():
    from fleetrl.run.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="importance_sampling"):
        load_config(EXAMPLE, ["learner.loss.importance_sampling.low=1.5"])


def test_one_optimizer_step_leaves_the_correction_to_the_train_forward():
    cfg = load_config(EXAMPLE)  # 128 samples, one mini-batch, one epoch
    samples, batch = _batch()
    batch["advantages"] = torch.tensor([1.0, -2.0])
    sampler = batch["old_logprobs"].clone()
    learner = FixedLearner(torch.zeros(2, 4))
    correction = OffPolicyCorrection(cfg, learner)
    assert correction.in_train_forward and correction(batch, samples, learner_version=4) == {}
    assert learner.calls == 0  # no extra pass
    assert torch.equal(batch["behaviour_logprobs"], sampler) and batch["fresh"].tolist() == [True, False]
    # The learner's step statistics carry the correction's metrics; they are taken out of them.
    train = [{"loss": 0.1, "is/weight_mean": 1.0, "mismatch/abs_logp_diff": 0.0, "mismatch/tokens": 2.0}]
    assert correction.from_train(train) == {"is/weight_mean": 1.0, "mismatch/abs_logp_diff": 0.0,
                                            "mismatch/tokens": 2.0}
    assert train == [{"loss": 0.1}]
    no_fresh = [{"is/weight_mean": 1.0, "mismatch/abs_logp_diff": float("nan"), "mismatch/tokens": 0.0}]
    assert correction.from_train(no_fresh) == {"is/weight_mean": 1.0}
    assert not OffPolicyCorrection(load_config(EXAMPLE, ["learner.lora.dropout=0.1"]), learner).in_train_forward


def test_a_learner_refuses_the_in_forward_correction_over_several_optimizer_steps():
    """The train forward's log-probs are the proximal ones only for the first optimizer step: a batch
    asking for the correction there (behaviour_logprobs) with more steps is refused, not trained wrong."""
    from types import SimpleNamespace

    from fleetrl.learner.rank import Learner

    learner = Learner.__new__(Learner)
    learner.engine = SimpleNamespace(mini_batch_size=2, mini_per_rank=2, world_size=1)
    learner.objective = SimpleNamespace(check=lambda batch: batch["input_ids"].shape[0])
    rows = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "behaviour_logprobs": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match=r"one optimizer step per batch, but it gets 1 epoch\(s\) x 2 mini-batch"):
        learner.train(rows, mini_batch_size=2)
    with pytest.raises(ValueError, match=r"2 epoch\(s\) x 1 mini-batch"):
        learner.train({k: v[:2] for k, v in rows.items()}, mini_batch_size=2, epochs=2)


def test_a_policy_with_dropout_keeps_the_separate_pass():
    """In train mode a model with dropout gives log-probs an eval pass would not: the proximal ones
    then come from the separate (eval) pass. The ranks report their policy's largest dropout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fleetrl.learner.engine import active_dropout

    def qwen(**kw):
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, **kw))

    assert active_dropout(qwen()) == 0.0
    assert active_dropout(qwen(attention_dropout=0.1)) == pytest.approx(0.1)  # a config value, not a module
    assert active_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))) == pytest.approx(0.2)

    cfg = load_config(EXAMPLE)
    learner = FixedLearner(torch.zeros(2, 4))
    learner.rank_info = [{"rank": 0, "dropout": 0.0}]
    assert OffPolicyCorrection(cfg, learner).in_train_forward
    learner.rank_info = [{"rank": 0, "dropout": 0.1}]
    correction = OffPolicyCorrection(cfg, learner)
    assert not correction.in_train_forward
    samples, batch = _batch()
    batch["advantages"] = torch.tensor([1.0, -2.0])
    correction(batch, samples, learner_version=4)
    assert learner.calls == 1 and "behaviour_logprobs" not in batch
