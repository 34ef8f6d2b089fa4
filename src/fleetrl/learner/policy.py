"""The policy objective: PPO-style clipped policy loss plus optional KL and entropy terms.

The policy loss itself is looked up by name (`learner.loss.policy_loss`, default "ppo") in
`fleetrl.algos.POLICY_LOSSES`; this objective adds the KL to the frozen reference (when
`learner.loss.kl_in` is "loss") and the entropy bonus, aggregated like the policy loss
(`learner.loss.agg`). A learner rank running it (`Learner(..., objective="policy")`, learner/rank.py)
is what online RL trains; `LearnerGroup` runs one per Ray actor.

Train batch (CPU tensors, [B, T] aligned with input_ids, see learner/forward.py): input_ids,
attention_mask, loss_mask, old_logprobs, advantages ([B] or [B, T]), ref_logprobs (when kl_coef > 0
with kl_in "loss"). With ``behaviour_logprobs`` (the sampler's) and ``fresh`` ([B]) the batch asks for
the off-policy correction in this forward (online/off_policy.py): the forward's detached log-probs
are the proximal ones when the batch is trained in a single optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from fleetrl.algos.kl import kl_estimate
from fleetrl.algos.off_policy import decoupled_correction
from fleetrl.algos.reduce import aggregate
from fleetrl.algos.registry import POLICY_LOSSES
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.forward import token_logps
from fleetrl.learner.objective import OBJECTIVES, Objective

TRAIN_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "advantages")
# Stats averaged over valid completion tokens (loss and policy_loss: over the agg's units).
_TOKEN_STATS = ("kl", "entropy", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean")


def agg_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """What `aggregate(..., agg)` averages over: tokens, sequences with tokens, or all sequences."""
    if agg == "token-mean":
        return mask.float().sum()
    if agg == "seq-mean-token-mean":
        return (mask.float().sum(-1) > 0).float().sum()
    return torch.tensor(float(mask.shape[0]))


def check_shapes(batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Every key present, every per-token tensor shaped like input_ids (advantages may be [B])."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"learner batch is missing {missing}; it has {sorted(batch)}")
    shape = tuple(batch["input_ids"].shape)
    for k in keys + ("ref_logprobs", "behaviour_logprobs"):
        if k in batch and k != "advantages" and tuple(batch[k].shape) != shape:
            raise ValueError(f"learner batch[{k!r}] has shape {tuple(batch[k].shape)}, input_ids has {shape}")


@OBJECTIVES.register("policy", role="policy")
class PolicyObjective(Objective):
    """Clipped policy loss (+ kl_coef * KL to the reference, - entropy_coef * entropy) of `learner.loss`."""

    train_keys = TRAIN_KEYS

    def __init__(self, models, learner_cfg: LearnerConfig | dict | None = None, options: Any = None,
                 **kw: Any):
        super().__init__(models, learner_cfg, options, **{"name": "policy", **kw})
        self.lc = self.cfg.loss
        self.policy_loss = POLICY_LOSSES.get(self.lc.policy_loss)

    @classmethod
    def needs_reference(cls, name: str, learner_cfg: LearnerConfig) -> bool:
        return learner_cfg.reference

    def check(self, batch: dict[str, torch.Tensor]) -> int:
        check_shapes(batch, self.train_keys)
        lc = self.lc
        if lc.kl_in == "loss" and lc.kl_coef > 0 and "ref_logprobs" not in batch:
            raise KeyError(
                f"learner.loss.kl_coef={lc.kl_coef} with kl_in='loss' needs batch['ref_logprobs']: "
                "compute them with compute_logprobs(batch, 'reference'), or set kl_coef: 0"
            )
        return batch["input_ids"].shape[0]

    @staticmethod
    def _mask(micro: dict[str, torch.Tensor]) -> torch.Tensor:
        return micro["loss_mask"].float() * micro["attention_mask"].float()

    def units(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        return agg_units(self._mask(micro), self.lc.agg)

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, temperature: float = 1.0) -> torch.Tensor:
        lc, dev = self.lc, self.device
        m = self._mask(micro).to(dev)
        entropy_mode = "grad" if lc.entropy_coef != 0 else "detached"
        logp, ent = token_logps(self.models.policy, micro["input_ids"], micro["attention_mask"], dev,
                                temperature, entropy_mode, pack=self.cfg.pack_samples,
                                chunk_tokens=self.cfg.logprob_chunk_tokens)
        old, adv = micro["old_logprobs"].to(dev).float(), micro["advantages"].to(dev).float()
        if "behaviour_logprobs" in micro:
            old, adv = self._correct(logp.detach(), micro, adv, m, stats)
        pl, st = self.policy_loss(
            logp, old, adv, m, clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip, agg=lc.agg,
        )
        loss = pl
        kl = torch.zeros((), device=dev)
        if "ref_logprobs" in micro:
            ref = micro["ref_logprobs"].to(dev).float()
            kl = aggregate(kl_estimate(logp, ref, lc.kl_estimator), m, lc.agg)
            if lc.kl_in == "loss" and lc.kl_coef > 0:
                loss = loss + lc.kl_coef * kl
        ent_agg = aggregate(ent, m, lc.agg)
        if lc.entropy_coef != 0:
            loss = loss - lc.entropy_coef * ent_agg

        u = agg_units(m, lc.agg).double().cpu()
        tok = m.sum().double().cpu()
        stats.mean("loss", loss.detach().double().cpu() * u, u, empty=0.0)
        stats.mean("policy_loss", pl.detach().double().cpu() * u, u, empty=0.0)
        token_vals = {"kl": kl, "entropy": ent_agg, **st}
        for key in _TOKEN_STATS:
            stats.mean(key, token_vals[key].detach().double().cpu() * tok, tok, empty=0.0)
        stats.max("ratio_max", st["ratio_max"].detach().double().cpu())
        stats.sum("num_tokens", tok)
        return loss

    def _correct(self, proximal: torch.Tensor, micro: dict[str, torch.Tensor], adv: torch.Tensor,
                 m: torch.Tensor, stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoupled PPO against this forward's own (proximal) log-probs; records is/* and mismatch/*."""
        c, dev = self.lc.importance_sampling, self.device
        old, adv, st = decoupled_correction(proximal, micro["behaviour_logprobs"].to(dev).float(), adv, m,
                                            micro["fresh"].to(dev), c.mode, cap=c.cap, low=c.low, high=c.high)
        tok, fresh_tok = m.sum().double().cpu(), st.pop("mismatch/tokens").double().cpu()
        stats.max("is/weight_max", st.pop("is/weight_max").double().cpu())
        stats.sum("mismatch/tokens", fresh_tok)
        for key, v in st.items():
            count = fresh_tok if key.startswith("mismatch/") else tok
            stats.mean(key, v.double().cpu() * count, count)
        return old, adv
