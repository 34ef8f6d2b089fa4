"""PPO's clipped surrogate policy loss, registered as POLICY_LOSSES "ppo", and what every policy
loss shares (input checks, the ratio statistics).

Conventions
- ``logp`` (the policy being trained, with grad), ``old_logp`` (the policy that sampled) and
  ``mask`` are ``[B, T]``; advantages are ``[B]`` (one per sequence) or ``[B, T]``.
- Every policy loss has the signature ``fn(logp, old_logp, advantages, mask, *, clip_low,
  clip_high, dual_clip, agg) -> (loss 0-d, stats)`` with stats clip_frac, dual_clip_frac,
  approx_kl, ratio_mean, ratio_max: detached 0-d tensors over valid tokens (0 with none).
- Padding never leaks: log-ratios and advantages are zeroed there before exp (exp(garbage) = inf
  would poison gradients) and log-ratios are clamped to +-LOG_RATIO_CLAMP.
"""

from __future__ import annotations

import torch

from fleetrl.algos.kl import LOG_RATIO_CLAMP, kl_estimate
from fleetrl.algos.reduce import aggregate, expand_advantages, masked_max, masked_mean
from fleetrl.algos.registry import POLICY_LOSSES


def policy_inputs(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid [B, T] bool, log_ratio [B, T], advantages [B, T]): checked, padding zeroed, clamped."""
    valid = mask.bool()
    for name, t in (("logp", logp), ("old_logp", old_logp)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}")
    adv = expand_advantages(advantages, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(valid, logp - old_logp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return valid, log_ratio, torch.where(valid, adv.to(logp.dtype), zero)


@torch.no_grad()
def ratio_stats(
    logp: torch.Tensor, old_logp: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor,
    clipped: torch.Tensor, dual_clipped: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The stats every policy loss reports. ``ratio`` is the importance ratio the loss used (per
    token or a sequence's, repeated on its tokens); ``clipped`` marks tokens whose term was clipped.
    approx_kl = mean k3 estimate of KL(old || new) from the old policy's samples."""
    if dual_clipped is None:
        dual_clipped = torch.zeros_like(clipped)
    return {
        "clip_frac": masked_mean(clipped.float(), mask),
        "dual_clip_frac": masked_mean(dual_clipped.float(), mask),
        "approx_kl": masked_mean(kl_estimate(old_logp.detach(), logp.detach(), "k3"), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
        # ratio > 0, so padding at 0 never wins and an all-padding batch reports 0.
        "ratio_max": masked_max(ratio.detach(), mask),
    }


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: per token max(-r*A, -clip(r, 1-clip_low, 1+clip_high)*A), r = exp(logp - old).

    clip_high > clip_low is DAPO's clip-higher. dual_clip=c (> 1) also caps the loss of tokens with
    A < 0 at -c*A (dual-clip PPO), so a huge ratio on a bad token cannot blow up the update.
    clip_frac counts tokens where the clipped branch was strictly larger.
    """
    _, log_ratio, adv = policy_inputs(logp, old_logp, advantages, mask)
    ratio = torch.exp(log_ratio)
    loss_mat, clipped, dual_taken = clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
    return aggregate(loss_mat, mask, agg), ratio_stats(logp, old_logp, ratio, mask, clipped, dual_taken)


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token max(-r*A, -clip(r, 1-clip_low, 1+clip_high)*A), capped at -dual_clip*A where A < 0.

    Returns (loss [B, T], where the clipped branch was strictly larger, where the dual clip capped).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {dual_clip}")
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    dual_taken = torch.zeros_like(loss_mat, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_taken = (adv < 0) & (loss_mat > cap)
        loss_mat = torch.where(dual_taken, cap, loss_mat)
    return loss_mat, clipped > unclipped, dual_taken
