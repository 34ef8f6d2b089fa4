"""Preference and feedback losses of the offline trainers (DPO, IPO, KTO, ORPO, RM, offline PPO).

Conventions as in ``fleetrl.algos.reduce``: inputs are per-example sequence log-probs ``[B]`` (or
per-token ``[B, T]`` with a mask), and every loss is UNREDUCED, one value per example ``[B]``;
the trainer reduces.

Pair losses (trained on chosen / rejected pairs, scored by the policy's log-probs) are registered
in ``PREFERENCE_LOSSES`` under their algorithm's name, all with one signature::

    fn(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
       ref_chosen_logps=None, ref_rejected_logps=None, **hyperparameters) -> (losses [B], stats)

Log-probs are SUMMED over each completion's tokens, ``*_tokens`` are the completion lengths (a loss
that length-normalises divides by them); ``hyperparameters`` are the fields of the algorithm's
config section (e.g. ``dpo.beta``). ``stats`` holds per-pair detached ``[B]`` tensors, at least the
implicit rewards ``rewards/chosen`` and ``rewards/rejected``. Metadata: ``needs_reference`` (the
trainer supplies the frozen reference's log-probs, else passes None).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fleetrl.algos.kl import LOG_RATIO_CLAMP
from fleetrl.algos.reduce import masked_mean
from fleetrl.algos.registry import PREFERENCE_LOSSES

# ---------------------------------------------------------------------------------------------
# preference losses (unreduced, one value per example)
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (with conservative-DPO label smoothing). Inputs are summed sequence log-probs, [B].

    margin = (pc - rc) - (pr - rr);
    loss = -(1 - ls) * logsigmoid(beta * margin) - ls * logsigmoid(-beta * margin).
    Returns (losses [B], chosen_rewards, rejected_rewards) with rewards = beta * (policy - ref), detached.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: (margin - 1/(2*beta))^2, margin as in DPO but from LENGTH-AVERAGED log-probs.

    The square regresses the margin onto 1/(2*beta): below the target, raising the chosen log-prob
    lowers the loss; above it the gradient reverses (that is IPO's built-in regularization).
    Returns (losses [B], chosen_rewards, rejected_rewards), rewards = beta * (policy - ref), detached.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def kto_reference_point(
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO reference point z0 = max(0, mean(kl_policy_logps - kl_ref_logps)), detached 0-d tensor.

    The inputs are the log-probs of the mismatched (x_i, y_{i+1}) pairs (see kto_shifted_pairs).
    In data-parallel training pass ``all_reduce_mean`` (e.g. an all-reduce AVG over ranks) so every
    rank uses the same z0; it is applied to the local mean before the clamp.
    """
    mean = (kl_policy_logps.detach().float() - kl_ref_logps.detach().float()).mean()
    if all_reduce_mean is not None:
        mean = all_reduce_mean(mean)
    return mean.clamp(min=0.0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO with r = policy - ref: desirable lambda_D * (1 - sigmoid(beta * (r - z0))),
    undesirable lambda_U * (1 - sigmoid(beta * (z0 - r))). desirable: bool [B].

    Returns (losses [B], rewards = beta * r detached).
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True = desirable), got dtype {desirable.dtype}")
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable shape {tuple(desirable.shape)} != policy_logps {tuple(policy_logps.shape)}"
        )
    r = policy_logps - ref_logps
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    good = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad), (beta * r).detach()


def kto_default_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) such that lambda_D * nD / (lambda_U * nU) lies in [1, 1.5] (KTO paper).

    The majority class keeps weight 1.0; the minority's weight is raised by the least amount that
    puts the ratio in the band: undesirable-majority -> ratio exactly 1; desirable-majority by more
    than 1.5x -> ratio exactly 1.5. If one class is absent its weight is irrelevant: (1.0, 1.0).
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"counts must be >= 0, got nD={n_desirable}, nU={n_undesirable}")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1.0:
        return n_undesirable / n_desirable, 1.0
    if ratio > 1.5:
        return 1.0, ratio / 1.5
    return 1.0, 1.0


def kto_shifted_pairs(batch_size: int) -> list[int]:
    """Completion index for each prompt's mismatched KL pair: prompt i is paired with y_{(i+1) mod m}."""
    if batch_size < 2:
        raise ValueError(
            f"KTO needs at least 2 examples per micro-batch to build mismatched KL pairs, got {batch_size}; "
            "raise the micro-batch size (with 1, an example would be paired with its own completion)"
        )
    return [(i + 1) % batch_size for i in range(batch_size)]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO: chosen_nll - beta * logsigmoid(log odds(chosen) - log odds(rejected)).

    log odds(p) = a - log(1 - exp(a)) with a the length-averaged log-prob, computed in fp32;
    a is clamped to <= -1e-6 so that a "certain" sequence (a = 0) gives a large but finite log odds.
    Returns (losses [B] fp32, log_odds_ratio [B] detached).
    """
    a_c = chosen_avg_logps.float().clamp(max=-1e-6)
    a_r = rejected_avg_logps.float().clamp(max=-1e-6)
    log_odds = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))
    losses = chosen_nll.float() - beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def _require_reference(name: str, ref_chosen_logps, ref_rejected_logps) -> None:
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"{name} needs the reference log-probs of chosen and rejected")


@PREFERENCE_LOSSES.register("dpo", needs_reference=True)
def dpo_pair_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                  ref_chosen_logps=None, ref_rejected_logps=None, *, beta: float = 0.1,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO / cDPO on summed log-probs; rewards beta * (policy - reference) of each answer."""
    _require_reference("dpo", ref_chosen_logps, ref_rejected_logps)
    losses, rc, rr = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta=beta, label_smoothing=label_smoothing)
    return losses, {"rewards/chosen": rc, "rewards/rejected": rr}


@PREFERENCE_LOSSES.register("ipo", needs_reference=True)
def ipo_pair_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                  ref_chosen_logps=None, ref_rejected_logps=None, *,
                  beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO on LENGTH-AVERAGED log-probs; rewards beta * (policy - reference) of the averages."""
    _require_reference("ipo", ref_chosen_logps, ref_rejected_logps)
    nc, nr = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    losses, rc, rr = ipo_loss(chosen_logps / nc, rejected_logps / nr, ref_chosen_logps / nc,
                              ref_rejected_logps / nr, beta=beta)
    return losses, {"rewards/chosen": rc, "rewards/rejected": rr}


@PREFERENCE_LOSSES.register("orpo", needs_reference=False)
def orpo_pair_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                   ref_chosen_logps=None, ref_rejected_logps=None, *,
                   beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO on length-averaged log-probs (no reference); reward beta * average log-prob, plus its
    two terms (orpo/nll, orpo/or_loss) and the log odds ratio."""
    avg_c = chosen_logps / chosen_tokens.clamp(min=1)
    avg_r = rejected_logps / rejected_tokens.clamp(min=1)
    losses, log_odds = orpo_loss(avg_c, avg_r, -avg_c, beta=beta)
    nll = (-avg_c).detach().float()
    return losses, {"rewards/chosen": (beta * avg_c).detach(), "rewards/rejected": (beta * avg_r).detach(),
                    "orpo/nll": nll, "orpo/or_loss": losses.detach() - nll, "orpo/log_odds_ratio": log_odds}


def pairwise_reward_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry reward-model loss -logsigmoid(c - r - margin), [B] (margin as in Llama 2's RM)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def offline_binary_ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rewards_pm1: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> torch.Tensor:
    """Clipped surrogate on offline data labelled good (+1) / bad (-1), one value per example [B].

    Every valid token of example b gets advantage rewards_pm1[b]; the per-token loss
    max(-r*A, -clip(r, 1-clip, 1+clip)*A) is averaged over the example's valid tokens.
    """
    if rewards_pm1.shape != (mask.shape[0],):
        raise ValueError(f"rewards_pm1 must be [batch]={mask.shape[0]}, got shape {tuple(rewards_pm1.shape)}")
    if not torch.all((rewards_pm1 == 1) | (rewards_pm1 == -1)):
        raise ValueError("rewards_pm1 must contain only +1 (good) and -1 (bad); map labels before calling")
    valid = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(valid, logp - old_logp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = rewards_pm1.to(logp.dtype).unsqueeze(-1)
    loss_mat = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip))
    return masked_mean(loss_mat, mask, dim=-1)
