"""The learner's policy objective on a multi-turn batch: observation tokens carry no loss weight,
no KL, no entropy and no gradient (whatever their logprobs, references or advantages say)."""

import pytest
import torch

from fleetrl.algos.logprobs import token_logprobs
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.objective import LocalModels
from fleetrl.learner.rank import objective_class
from fleetrl.online.batch import Sample, pad_samples
from tests.unit.test_offline_ppo import tiny_lm


def _loss_and_grads(model, batch):
    from fleetrl.learner.accumulate import Stats

    cfg = LearnerConfig(micro_batch_size=2, loss={"kl_coef": 0.5, "kl_in": "loss", "entropy_coef": 0.1})
    obj = objective_class("policy")(LocalModels(model), cfg)
    model.zero_grad()
    stats = Stats()
    loss = obj.loss(batch, stats)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None], stats


def test_observation_tokens_have_no_loss_kl_entropy_or_gradient():
    model = tiny_lm(0)
    # prompt [5, 6]; turn 1 [7, 8]; observation [30, 31, 32]; turn 2 [9, 10]
    episode = Sample(0, "", [5, 6], [7, 8, 30, 31, 32, 9, 10], [0.0] * 7, "stop", 0,
                     completion_mask=[1, 1, 0, 0, 0, 1, 1])
    single = Sample(1, "", [5, 6], [11, 12, 13], [0.0] * 3, "stop", 0)
    batch = pad_samples([episode, single], pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["input_ids"])
    obs = batch["observation_mask"].bool()
    assert obs[0].tolist() == [False, False, False, False, True, True, True, False, False]
    batch.update(old_logprobs=lp * batch["loss_mask"], advantages=torch.tensor([1.0, -1.0]).unsqueeze(-1).expand(2, 9),
                 ref_logprobs=lp - 0.3)
    loss, grads, stats = _loss_and_grads(model, batch)
    assert stats.sums["num_tokens"] == 7.0  # 4 policy tokens of the episode + 3 of the single completion

    garbage = {k: v.clone() for k, v in batch.items()}
    for key, value in (("old_logprobs", -50.0), ("ref_logprobs", 40.0), ("advantages", 1e4)):
        garbage[key] = torch.where(obs, torch.full_like(batch[key].float(), value), batch[key].float())
    loss2, grads2, _ = _loss_and_grads(model, garbage)
    assert loss2 == pytest.approx(loss, abs=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
