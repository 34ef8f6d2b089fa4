"""Off-policy correction of one rollout batch (decoupled PPO), and the sampler/learner mismatch.

With ``learner.loss.importance_sampling.mode`` truncate or mask, the learner's log-probs under the
weights it holds before the update (the proximal policy) are needed. Then
(fleetrl.algos.off_policy.decoupled_correction):
- the PPO ratio is taken against those log-probs (``old_logprobs`` := proximal), and
- each token's advantage is multiplied by its importance weight w = pi_prox / mu (mu: the sampler
  that produced the token), truncated (TIS) or masked (MIS).
Every registered policy loss is linear in the advantage for a positive per-token factor, so
weighting the advantages weights each token's loss: no loss needs to know about it.

Where they come from:
- **In the train forward** when the batch is trained in exactly one optimizer step (one mini-batch,
  one epoch) and the policy applies no dropout (LoRA's or the model's): the train forward runs on
  the proximal weights, so its detached log-probs are the proximal ones and a separate pass would
  compute the same numbers again. The driver sends the sampler's log-probs as
  ``behaviour_logprobs`` (with ``fresh``) and the policy objective applies the correction per
  micro-batch (learner/policy.py); its statistics come back with the train step's.
- **From a separate log-prob pass** otherwise (several optimizer steps move the weights before the
  later mini-batches are trained; dropout makes a train forward differ from an eval one), here in
  the driver.

The same numbers measure how far the learner is from the sampler on tokens sampled with the very
weights the learner holds (staleness 0, no update in flight): mismatch/abs_logp_diff and
mismatch/kl (KL(sampler || learner)). Nonzero there is numerics (kernels, dtypes), not lag.
"""

from __future__ import annotations

import math
import time

import torch

from fleetrl.algos.off_policy import decoupled_correction
from fleetrl.online.batch import Sample
from fleetrl.run.config import RunConfig

_STAT_PREFIXES = ("is/", "mismatch/")


class OffPolicyCorrection:
    def __init__(self, cfg: RunConfig, learner):
        self.cfg, self.learner = cfg, learner
        self.is_cfg = cfg.learner.loss.importance_sampling

    @property
    def active(self) -> bool:
        return self.is_cfg.mode != "off"

    @property
    def in_train_forward(self) -> bool:
        """One optimizer step per batch and no dropout in the policy (its ranks' `dropout`, e.g. a
        model config's attention dropout): the train forward's log-probs are the proximal ones."""
        lora = self.cfg.learner.lora
        ranks = getattr(self.learner, "rank_info", None) or []
        return (self.active and self.cfg.optimizer_steps_per_step == 1
                and (lora is None or lora.dropout == 0) and all(r.get("dropout", 0.0) == 0 for r in ranks))

    def __call__(self, batch: dict[str, torch.Tensor], samples: list[Sample],
                 learner_version: int) -> dict[str, float]:
        """Rewrites the batch in place for the learner; returns the step's metrics (with the
        correction in the train forward, they come later: ``from_train``)."""
        if not self.active:
            return {}
        fresh = torch.tensor([s.weight_version == learner_version and not s.updated_in_flight for s in samples])
        if self.in_train_forward:
            batch["behaviour_logprobs"] = batch["old_logprobs"]
            batch["fresh"] = fresh
            return {}
        t = time.perf_counter()
        mask = batch["loss_mask"].bool() & batch["attention_mask"].bool()
        proximal = self.learner.compute_logprobs(batch, which="policy",
                                                 temperature=self.cfg.rollout.sampling.temperature)
        c = self.is_cfg
        batch["old_logprobs"], batch["advantages"], stats = decoupled_correction(
            proximal, batch["old_logprobs"], batch["advantages"], mask, fresh, c.mode, cap=c.cap, low=c.low,
            high=c.high)
        metrics = _metrics({k: float(v) for k, v in stats.items()})
        metrics["time/proximal"] = time.perf_counter() - t
        return metrics

    @staticmethod
    def from_train(train_stats: list[dict[str, float]]) -> dict[str, float]:
        """The correction's metrics out of the learner's step statistics (removed from them)."""
        out: dict[str, float] = {}
        for row in train_stats:
            for k in [k for k in row if k.startswith(_STAT_PREFIXES)]:
                out[k] = row.pop(k)
        return _metrics(out)


def _metrics(stats: dict[str, float]) -> dict[str, float]:
    """Mismatch metrics only when some tokens were sampled with the learner's own weights."""
    if not stats.get("mismatch/tokens") or any(math.isnan(v) for k, v in stats.items() if k.startswith("mismatch/")):
        stats = {k: v for k, v in stats.items() if not k.startswith("mismatch/")}
    return stats
