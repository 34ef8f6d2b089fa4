"""Advantages of one rollout batch, for whichever online algorithm the run config names.

The algorithm's declaration (fleetrl.algos.registry.OnlineAlgorithm) says everything this needs:
its advantage estimator (group or per-token), whether a critic gives values, its config section.
Nothing here compares algorithm names.

    step = AdvantageStep(cfg, learner, critic)
    out = step(batch, scores)            # reference log-probs, KL shaping, critic values, advantages
    batch["advantages"] = out.advantages # [N] (group estimators) or [B, T] (per-token)
    out.critic_batch                     # the critic's regression targets, when there is a critic

Group estimators give each sample one advantage from its group's rewards (with kl_in: reward the
rewards first pay the sequence's KL). Per-token estimators put each sample's score on its last
token, a KL penalty on every token (fleetrl.algos.shaping), and give every token its own
advantage; statistics are over completion tokens only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fleetrl.algos import ADVANTAGE_ESTIMATORS
from fleetrl.algos.kl import AdaptiveKLController, FixedKLController, kl_estimate
from fleetrl.algos.reduce import masked_mean, masked_mean_std, masked_sum, masked_whiten
from fleetrl.algos.shaping import sequence_rewards_with_kl
from fleetrl.algos.value import explained_variance
from fleetrl.run.config import RunConfig, TokenRewardConfig


@dataclass
class TokenAdvantages:
    advantages: torch.Tensor  # [B, T], what the policy update gets (0 off the completion tokens)
    returns: torch.Tensor  # [B, T]: GAE returns (the critic's targets) or returns-to-go
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepAdvantages:
    advantages: torch.Tensor  # [N] or [B, T]
    metrics: dict[str, float] = field(default_factory=dict)
    critic_batch: dict[str, torch.Tensor] | None = None  # the critic's training batch, if any
    reference_s: float = 0.0  # time spent on the reference log-probs


def completion_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B, T]: completion tokens that are real (loss_mask and attention_mask)."""
    return batch["loss_mask"].bool() & batch["attention_mask"].bool()


def token_kl(batch: dict[str, torch.Tensor], estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the sampled tokens, policy (sampler log-probs) vs reference; 0 off
    the completion tokens. Needs batch["old_logprobs"] and batch["ref_logprobs"]."""
    mask = completion_mask(batch)
    kl = kl_estimate(batch["old_logprobs"].float(), batch["ref_logprobs"].float(), estimator)
    return torch.where(mask, kl, torch.zeros((), dtype=kl.dtype))


def make_kl_controller(cfg: RunConfig) -> FixedKLController | AdaptiveKLController:
    """The KL coefficient of the per-token reward, starting at learner.loss.kl_coef."""
    section = cfg.token_rl
    if section.kl_control == "adaptive":
        return AdaptiveKLController(cfg.learner.loss.kl_coef, section.kl_target, section.kl_horizon)
    return FixedKLController(cfg.learner.loss.kl_coef)


@torch.no_grad()
def group_advantages(estimator: str, rewards: torch.Tensor, group_size: int,
                     std_scale: str | None = None) -> torch.Tensor:
    """One advantage per sample from a group estimator; groups contiguous. ``std_scale`` is
    rl.advantage_std, passed to estimators that take a ``scale`` option."""
    options = ADVANTAGE_ESTIMATORS.meta(estimator).get("options", ())
    kwargs = {"scale": std_scale} if std_scale is not None and "scale" in options else {}
    return ADVANTAGE_ESTIMATORS.get(estimator)(rewards, group_size, **kwargs)


@torch.no_grad()
def token_advantages(
    estimator: str,
    section: TokenRewardConfig,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    kl_coef: float,
    group_size: int = 1,
    values: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> TokenAdvantages:
    """Advantages of one rollout batch from a per-token estimator (an ADVANTAGE_ESTIMATORS name).

    scores [B]: each sequence's reward; mask [B, T]: completion tokens (contiguous per row);
    kl [B, T] or None (no KL in the reward); values [B, T]: the critic's values at sampling time
    (estimators that need them), aligned with the tokens as learner/critic.py documents.
    ``section`` is the algorithm's config section (gamma, reward_clip; lam and whiten_advantages
    where it has them).
    """
    if not ADVANTAGE_ESTIMATORS.meta(estimator).get("per_token", False):
        raise ValueError(f"{estimator!r} is not a per-token advantage estimator; per-token ones: "
                         + ", ".join(n for n in ADVANTAGE_ESTIMATORS
                                     if ADVANTAGE_ESTIMATORS.meta(n).get("per_token")))
    mask = mask.bool()
    scores = scores.float()
    metrics: dict[str, float] = {}
    if section.reward_clip is not None:
        c = section.reward_clip
        metrics["reward/clip_frac"] = float((scores.abs() > c).float().mean())
        scores = scores.clamp(-c, c)
    observed_kl = kl
    if kl is None or kl_coef == 0:
        kl, kl_coef = torch.zeros(mask.shape), 0.0
    advantages, returns = ADVANTAGE_ESTIMATORS.get(estimator)(
        scores, mask, kl=kl, kl_coef=kl_coef, group_size=group_size, values=values,
        gamma=section.gamma, lam=getattr(section, "lam", 1.0), skip=skip)
    if values is not None:
        metrics["values/mean"] = float(masked_mean(values.float(), mask))
        metrics["critic/explained_variance"] = float(explained_variance(values, returns, mask))
    if getattr(section, "whiten_advantages", False):
        metrics["advantage/raw_mean"], metrics["advantage/raw_std"] = masked_mean_std(advantages, mask)
        advantages = masked_whiten(advantages, mask)
    metrics["returns/mean"], metrics["returns/std"] = masked_mean_std(returns, mask)
    metrics["advantage/mean"], metrics["advantage/std"] = masked_mean_std(advantages, mask)
    metrics["kl/coef"] = float(kl_coef)
    if observed_kl is not None and mask.shape[0] > 0:
        # What the adaptive controller steers: KL per sequence (summed over its tokens), batch mean.
        metrics["kl/seq_mean"] = float(masked_sum(observed_kl.float(), mask, dim=-1).mean())
    return TokenAdvantages(advantages, returns, metrics)


def critic_batch(batch: dict[str, torch.Tensor], values: torch.Tensor,
                 returns: torch.Tensor) -> dict[str, torch.Tensor]:
    """The critic's training batch: the rollout's tokens, its sampling-time values and the returns."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "loss_mask": batch["loss_mask"],
        "old_values": values.float(),
        "returns": returns.float(),
    }


class AdvantageStep:
    """Rollout batch + scores -> advantages for the run's algorithm. Holds the KL controller of
    per-token algorithms (its value is checkpointed as ``kl_coef``)."""

    def __init__(self, cfg: RunConfig, learner, critic=None, teacher=None):
        self.cfg, self.learner, self.critic, self.teacher = cfg, learner, critic, teacher
        self.algo = cfg.online_algorithm
        self.kl_ctl = make_kl_controller(cfg) if self.algo.per_token else None
        self.use_ref = cfg.learner.reference and cfg.learner.loss.kl_coef > 0

    def __call__(self, batch: dict[str, torch.Tensor], scores: torch.Tensor) -> StepAdvantages:
        lc = self.cfg.learner.loss
        t = time.perf_counter()
        if self.use_ref:
            batch["ref_logprobs"] = self.learner.compute_logprobs(
                batch, which="reference", temperature=self.cfg.rollout.sampling.temperature)
        reference_s = time.perf_counter() - t
        kl = token_kl(batch, lc.kl_estimator) if "ref_logprobs" in batch else None
        if self.algo.teacher:
            out = self._distill(batch, scores)
        elif self.algo.per_token:
            out = self._per_token(batch, scores, kl)
        else:
            metrics = {}
            if kl is not None and lc.kl_in == "reward":
                # Each sample's reward pays its sequence's KL against the reference (with kl_in: loss
                # the learner adds the KL term to the loss instead).
                shaped = sequence_rewards_with_kl(scores, kl, completion_mask(batch), lc.kl_coef)
                metrics["kl/reward_penalty_mean"] = (scores.float() - shaped).mean().item()
                scores = shaped
            advantages = group_advantages(self.algo.advantage, scores, self.cfg.rl.group_size,
                                          self.cfg.rl.advantage_std)
            metrics["advantage/mean"] = advantages.mean().item()
            metrics["advantage/std"] = advantages.std().item() if len(advantages) > 1 else 0.0
            out = StepAdvantages(advantages, metrics)
        out.reference_s = reference_s
        return out

    def _distill(self, batch, scores: torch.Tensor) -> StepAdvantages:
        """opd: per-token advantage = -(student - teacher) log-prob of each sampled token (the
        sampler's log-probs are the student's), plus opd.reward_weight * the GRPO group advantage."""
        t = time.perf_counter()
        teacher_logp = self.teacher.compute_logprobs(batch, temperature=self.cfg.rollout.sampling.temperature)
        teacher_s = time.perf_counter() - t
        mask = completion_mask(batch)
        weight = self.cfg.opd.reward_weight
        group = group_advantages("grpo", scores, self.cfg.rl.group_size) if weight > 0 else None
        adv, rkl = ADVANTAGE_ESTIMATORS.get(self.algo.advantage)(batch["old_logprobs"], teacher_logp, mask,
                                                                 group, weight)
        metrics = {"distill/reverse_kl": float(masked_mean(rkl, mask)),
                   "distill/reverse_kl_seq": float(masked_sum(rkl, mask, dim=-1).mean()),
                   "time/teacher": teacher_s}
        metrics["advantage/mean"], metrics["advantage/std"] = masked_mean_std(adv, mask)
        return StepAdvantages(adv, metrics)

    def _per_token(self, batch, scores: torch.Tensor, kl: torch.Tensor | None) -> StepAdvantages:
        lc = self.cfg.learner.loss
        t = time.perf_counter()
        values = self.critic.compute_values(batch) if self.critic is not None else None
        metrics = {"time/critic_values": time.perf_counter() - t}
        result = token_advantages(self.algo.advantage, self.cfg.token_rl, scores, completion_mask(batch), kl,
                                  self.kl_ctl.value if lc.kl_in == "reward" else 0.0, self.cfg.rl.group_size,
                                  values, skip=batch.get("observation_mask"))
        metrics.update(result.metrics)
        if "kl/seq_mean" in result.metrics:
            self.kl_ctl.update(result.metrics["kl/seq_mean"], n_steps=len(scores))
        targets = critic_batch(batch, values, result.returns) if self.critic is not None else None
        return StepAdvantages(result.advantages, metrics, critic_batch=targets)
