"""Off-policy correction of one rollout batch (decoupled PPO), and the sampler/learner mismatch.

With ``learner.loss.importance_sampling.mode`` truncate or mask, the learner scores the batch
with the weights it holds before the update (the proximal policy). Then:
- the PPO ratio is taken against those log-probs (``old_logprobs`` := proximal), and
- each token's advantage is multiplied by its importance weight w = pi_prox / mu (mu: the sampler
  that produced the token), truncated (TIS) or masked (MIS) by fleetrl.algos.off_policy.
Every registered policy loss is linear in the advantage for a positive per-token factor, so
weighting the advantages weights each token's loss: no loss needs to know about it.

The same pass measures how far the learner is from the sampler on tokens sampled with the very
weights the learner holds (staleness 0, no update in flight): mismatch/abs_logp_diff and
mismatch/kl (KL(sampler || learner)). Nonzero there is numerics (kernels, dtypes), not lag.
"""

from __future__ import annotations

import time

import torch

from fleetrl.algos.off_policy import importance_weights, sampler_mismatch
from fleetrl.algos.reduce import expand_advantages
from fleetrl.online.batch import Sample
from fleetrl.run.config import RunConfig


class OffPolicyCorrection:
    def __init__(self, cfg: RunConfig, learner):
        self.cfg, self.learner = cfg, learner
        self.is_cfg = cfg.learner.loss.importance_sampling

    @property
    def active(self) -> bool:
        return self.is_cfg.mode != "off"

    def __call__(self, batch: dict[str, torch.Tensor], samples: list[Sample],
                 learner_version: int) -> dict[str, float]:
        """Rewrites batch["old_logprobs"] and batch["advantages"] in place; returns the step's metrics."""
        if not self.active:
            return {}
        t = time.perf_counter()
        mask = batch["loss_mask"].bool() & batch["attention_mask"].bool()
        behaviour = batch["old_logprobs"]
        proximal = self.learner.compute_logprobs(batch, which="policy",
                                                 temperature=self.cfg.rollout.sampling.temperature)
        metrics: dict[str, float] = {}
        fresh = torch.tensor([s.weight_version == learner_version and not s.updated_in_flight for s in samples])
        if fresh.any():
            metrics.update({k: float(v) for k, v in
                            sampler_mismatch(proximal, behaviour, mask & fresh.unsqueeze(-1)).items()})
        c = self.is_cfg
        weights, stats = importance_weights(proximal, behaviour, mask, c.mode, cap=c.cap, low=c.low, high=c.high)
        metrics.update({k: float(v) for k, v in stats.items()})
        batch["advantages"] = expand_advantages(batch["advantages"], mask).float() * weights
        batch["old_logprobs"] = torch.where(mask, proximal, torch.zeros((), dtype=proximal.dtype))
        metrics["time/proximal"] = time.perf_counter() - t
        return metrics
