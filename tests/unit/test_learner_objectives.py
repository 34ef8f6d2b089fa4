"""The composed learner without DeepSpeed: objectives built over plain modules (`LocalModels`) and the
one accumulation routine driven by a stand-in engine that scales like DeepSpeed (loss / accumulation
steps, summed gradients). The accumulated gradient must be the whole mini-batch's, whatever the split."""

from __future__ import annotations

import pytest
import torch

from fleetrl.algos.logprobs import token_logprobs
from fleetrl.algos.ppo import ppo_policy_loss
from fleetrl.learner.accumulate import optimizer_step
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.forward import micro_batches
from fleetrl.learner.objective import LocalModels
from fleetrl.learner.rank import objective_class
from tests.unit.test_offline_ppo import tiny_lm


class PlainEngine:
    """What optimizer_step needs of an engine, on one process: backward scaled by 1/grad_accum (as
    DeepSpeed does), gradients kept (no optimizer), the norm of the summed gradient at the end."""

    world_size = 1

    def __init__(self, model: torch.nn.Module, grad_accum: int):
        self.model, self.grad_accum, self.steps = model, grad_accum, 0

    def all_reduce(self, t, op="sum"):
        return t

    def lr(self) -> float:
        return 0.0

    def train_mode(self) -> None:
        self.model.train()

    def backward_step(self, loss, last):
        (loss / self.grad_accum).backward()
        self.steps += int(last)
        return None

    def grad_norm(self, own):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads))


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 11, 12, 0, 0, 0], [7, 8, 20, 21, 22, 23], [9, 3, 4, 0, 0, 0]])
    attn = (ids != 0).long()
    attn[:, 0] = 1
    loss_mask = attn.clone()
    loss_mask[:, :2] = 0
    loss_mask[3] = 0  # a row with no completion token
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_objective_accumulates_to_the_mini_batch_gradient(agg):
    cfg = LearnerConfig(micro_batch_size=1, loss={"agg": agg, "kl_coef": 0.0})
    b = batch()
    model = tiny_lm(0)
    with torch.no_grad():
        old = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                             b["input_ids"])
    b.update(old_logprobs=old, advantages=torch.tensor([1.0, -0.5, 2.0, -1.5]))
    obj = objective_class("policy")(LocalModels(model), cfg)
    engine = PlainEngine(model, grad_accum=4)
    out = optimizer_step(engine, micro_batches(b, 1), obj, temperature=1.0)
    assert engine.steps == 1 and out["policy_loss"] == pytest.approx(out["loss"], abs=1e-6)
    got = out["grad_norm"]

    # By hand: one forward of the whole mini-batch (right padding: default positions agree).
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logp = token_logprobs(logits, b["input_ids"])
    mask = (b["loss_mask"] * b["attention_mask"]).float()
    loss, _ = ppo_policy_loss(logp, old, b["advantages"], mask, agg=agg)
    loss.backward()
    expected = float(
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert got == pytest.approx(expected, rel=1e-4)
    assert out["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
    assert out["num_tokens"] == float(mask.sum()) and out["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_critic_objective_over_a_plain_value_model():
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_labels=1)).eval()
    b = batch()
    obj = objective_class("critic")(LocalModels(model), LearnerConfig(), {"value_clip": 0.5})
    assert obj.model_kind == "value" and not obj.needs_reference("critic", LearnerConfig())
    mask = (b["loss_mask"] * b["attention_mask"]).float()
    b.update(old_values=torch.zeros(4, 6), returns=mask * 2.0)
    engine = PlainEngine(model, grad_accum=2)
    out = optimizer_step(engine, micro_batches(b, 2), obj)
    assert set(out) >= {"value_loss", "vf_clip_frac", "values_mean", "value_mse", "grad_norm", "lr"}
    assert out["value_loss"] > 0 and out["grad_norm"] > 0
    with pytest.raises(ValueError, match="unknown critic options"):
        objective_class("critic")(LocalModels(model), LearnerConfig(), {"clip": 0.5})


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_correction_in_the_train_forward_equals_a_separate_proximal_pass(mode):
    """One optimizer step per batch: the policy objective applying decoupled PPO to its own forward's
    log-probs (behaviour_logprobs + fresh in the batch) gives the loss, gradient and is/ mismatch/
    statistics of the driver's way (a separate no-grad pass, then decoupled_correction)."""
    from fleetrl.algos.off_policy import decoupled_correction

    cfg = LearnerConfig(micro_batch_size=2, loss={"kl_coef": 0.0, "importance_sampling": {"mode": mode}})
    b = batch()
    mask = (b["loss_mask"] * b["attention_mask"]).bool()
    model = tiny_lm(0)
    with torch.no_grad():
        prox = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["input_ids"])
    gen = torch.Generator().manual_seed(0)
    behaviour = torch.where(mask, prox + 0.4 * torch.randn(prox.shape, generator=gen), torch.zeros(()))
    adv, fresh = torch.tensor([1.0, -0.5, 2.0, -1.5]), torch.tensor([True, False, True, True])

    def step(micro_batch: dict) -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad()
        obj = objective_class("policy")(LocalModels(model), cfg)
        out = optimizer_step(PlainEngine(model, grad_accum=2), micro_batches(micro_batch, 2), obj)
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    c = cfg.loss.importance_sampling
    old, weighted, st = decoupled_correction(prox, behaviour, adv, mask, fresh, mode, c.cap, c.low, c.high)
    two_pass, grads_two = step({**b, "old_logprobs": old, "advantages": weighted})
    fused, grads_fused = step({**b, "old_logprobs": behaviour, "advantages": adv,
                               "behaviour_logprobs": behaviour, "fresh": fresh})

    for g1, g2 in zip(grads_two, grads_fused, strict=True):
        assert torch.allclose(g1, g2, atol=1e-6)
    assert fused["loss"] == pytest.approx(two_pass["loss"], abs=1e-6)
    for key, v in st.items():  # the statistics of the whole batch, from per-micro-batch sums
        assert fused[key] == pytest.approx(float(v), abs=1e-5), key
    assert fused["mismatch/tokens"] == float((mask & fresh[:, None]).sum())
    assert not any(k.startswith(("is/", "mismatch/")) for k in two_pass)
