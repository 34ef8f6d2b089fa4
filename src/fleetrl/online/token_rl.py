"""Per-token advantages of ppo, reinforce_pp and reinforce_pp_baseline, from a padded rollout batch.

Pure functions (tensors in, tensors and numbers out); the online loop (orchestrator/online.py)
gets the scores from the reward service, the log-probs from the learner and the values from the
critic, and calls these between sampling and the updates:

    kl      = token_kl(batch, estimator)                       # policy vs reference, per token
    result  = token_advantages(algorithm, section, scores, mask, kl, kl_coef, group_size, values)
    batch["advantages"] = result.advantages                    # [B, T] -> the policy update
    critic_batch(batch, values, result.returns)                # ppo: the critic's regression targets

Every sequence's score lands on its last completion token; with the KL in the reward every
completion token also gets -kl_coef * KL_t. Statistics are over completion tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fleetrl.algos.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    reinforce_pp_returns,
    token_rewards_with_kl,
)
from fleetrl.algos.losses import explained_variance, kl_estimate, masked_mean, masked_sum
from fleetrl.run.config import PPOConfig, RunConfig, TokenRewardConfig


@dataclass
class TokenAdvantages:
    advantages: torch.Tensor  # [B, T], what the policy update gets (0 off the completion tokens)
    returns: torch.Tensor  # [B, T]: GAE returns (ppo, the critic's targets) or returns-to-go
    metrics: dict[str, float] = field(default_factory=dict)


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


def _mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return float(mean), float(var.sqrt())


@torch.no_grad()
def token_advantages(
    algorithm: str,
    section: TokenRewardConfig,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    kl_coef: float,
    group_size: int = 1,
    values: torch.Tensor | None = None,
) -> TokenAdvantages:
    """Advantages of one rollout batch.

    scores [B]: each sequence's reward; mask [B, T]: completion tokens (contiguous per row);
    kl [B, T] or None (no KL in the reward); values [B, T]: the critic's values at sampling time
    (ppo only), aligned with the tokens as learner/critic.py documents.
    """
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
    if algorithm == "ppo":
        if values is None:
            raise ValueError("ppo advantages need the critic's values at sampling time (values=[B, T])")
        if not isinstance(section, PPOConfig):
            raise TypeError(f"ppo takes the ppo section (PPOConfig), got {type(section).__name__}")
        rewards = token_rewards_with_kl(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, section.gamma, section.lam)
        metrics["values/mean"] = float(masked_mean(values.float(), mask))
        metrics["critic/explained_variance"] = float(explained_variance(values, returns, mask))
        if section.whiten_advantages:
            metrics["advantage/raw_mean"], metrics["advantage/raw_std"] = _mean_std(advantages, mask)
            advantages = masked_whiten(advantages, mask)
    elif algorithm in ("reinforce_pp", "reinforce_pp_baseline"):
        if algorithm == "reinforce_pp":
            advantages = reinforce_pp_advantages(scores, kl, mask, kl_coef, section.gamma)
            shaped = scores
        else:
            advantages = reinforce_pp_baseline_advantages(scores, group_size, kl, mask, kl_coef, section.gamma)
            shaped = scores - scores.view(-1, group_size).mean(1).repeat_interleave(group_size)
        # The returns-to-go the advantages whiten (for the metrics).
        returns = reinforce_pp_returns(token_rewards_with_kl(shaped, kl, mask, kl_coef), mask, section.gamma)
    else:
        raise ValueError(f"{algorithm!r} has no per-token advantages; allowed: ppo, reinforce_pp, "
                         "reinforce_pp_baseline")
    metrics["returns/mean"], metrics["returns/std"] = _mean_std(returns, mask)
    metrics["advantage/mean"], metrics["advantage/std"] = _mean_std(advantages, mask)
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
