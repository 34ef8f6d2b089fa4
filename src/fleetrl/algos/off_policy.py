"""Off-policy correction: importance weights between the sampler and the learner.

Conventions (as in ``fleetrl.algos.losses``): per-token tensors ``[B, T]`` with a ``mask``;
padding never reaches a result. ``behaviour_logp`` are the log-probs the sampler (vLLM) reported
for the tokens it sampled; ``proximal_logp`` are the learner's log-probs of the same tokens under
the weights the update starts from (decoupled PPO, Hilton et al. 2021: the PPO ratio is taken
against the proximal policy, and the gap between proximal and behaviour policy, due to staleness
or to sampler/learner numerics, is an importance weight w = pi_prox / mu).

Modes of bounding w (detached; it multiplies each token's loss):
- ``truncate`` (TIS): w = min(w, cap).
- ``mask`` (MIS): w kept as is where it lies in [low, high], the token dropped (weight 0) elsewhere.
"""

from __future__ import annotations

import torch

from fleetrl.algos.kl import LOG_RATIO_CLAMP, kl_estimate
from fleetrl.algos.reduce import expand_advantages, masked_mean

IS_MODES = ("truncate", "mask")


def importance_weights(
    proximal_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weights [B, T] (0 on padding, detached) and their statistics.

    Stats (detached 0-d tensors over valid tokens): is/weight_mean and is/weight_max of the raw
    weight w, is/truncated_frac (w > cap, truncate mode) or is/masked_frac (w outside [low, high],
    mask mode).
    """
    for name, t in (("proximal_logp", proximal_logp), ("behaviour_logp", behaviour_logp)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}")
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; allowed: {', '.join(IS_MODES)}")
    if mode == "truncate" and cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    if mode == "mask" and not 0 <= low < 1 < high:
        raise ValueError(f"the mask range must satisfy 0 <= low < 1 < high, got [{low}, {high}]")
    with torch.no_grad():
        valid = mask.bool()
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        log_w = torch.where(valid, proximal_logp.float() - behaviour_logp.float(), zero)
        w = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if mode == "truncate":
            cut = (w > cap) & valid
            bounded = torch.where(cut, torch.full_like(w, cap), w)
            stats = {"is/truncated_frac": masked_mean(cut.float(), mask)}
        else:
            cut = ((w < low) | (w > high)) & valid
            bounded = torch.where(cut, zero, w)
            stats = {"is/masked_frac": masked_mean(cut.float(), mask)}
        bounded = torch.where(valid, bounded, zero)
        stats["is/weight_mean"] = masked_mean(w, mask)
        stats["is/weight_max"] = torch.where(valid, w, zero).max() if w.numel() else zero
    return bounded, stats


@torch.no_grad()
def sampler_mismatch(learner_logp: torch.Tensor, sampler_logp: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the learner's log-probs are from the sampler's for the SAME weights and tokens.

    mismatch/abs_logp_diff = mean |logp_learner - logp_sampler| and mismatch/kl = KL(sampler ||
    learner) estimated from the sampler's own tokens (k3, unbiased and >= 0), over valid tokens.
    Only tokens sampled with the weights the learner holds belong in ``mask``.
    """
    diff = (learner_logp.float() - sampler_logp.float()).abs()
    return {
        "mismatch/abs_logp_diff": masked_mean(diff, mask),
        "mismatch/kl": masked_mean(kl_estimate(sampler_logp.float(), learner_logp.float(), "k3"), mask),
        "mismatch/tokens": mask.float().sum(),
    }


@torch.no_grad()
def decoupled_correction(
    proximal_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    fresh: torch.Tensor,
    mode: str,
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A rollout batch rewritten for decoupled PPO: (old_logprobs, advantages [B, T], stats).

    The PPO ratio's base becomes the proximal log-probs (0 on padding) and each token's advantage
    is multiplied by its bounded importance weight (``importance_weights``). ``fresh`` [B] marks the
    samples drawn with the proximal weights themselves (no lag, no update in flight): the sampler
    mismatch (``sampler_mismatch``) is measured on their tokens only. The stats are
    ``importance_weights``' plus ``mismatch/*`` (``mismatch/tokens`` 0 when no sample is fresh).
    """
    valid = mask.bool()
    weights, stats = importance_weights(proximal_logp, behaviour_logp, valid, mode, cap=cap, low=low, high=high)
    stats.update(sampler_mismatch(proximal_logp, behaviour_logp, valid & fresh.bool().unsqueeze(-1)))
    advantages = expand_advantages(advantages, valid).float() * weights
    old = torch.where(valid, proximal_logp.float(), torch.zeros((), dtype=torch.float32, device=valid.device))
    return old, advantages, stats
