"""Per-token advantage estimators (GAE with a critic, REINFORCE++ and its group-baseline variant)
and the online algorithms built on them: PPO, REINFORCE++, REINFORCE++ with a baseline.

Conventions
- Per-token tensors are ``[B, T]`` with a ``mask`` of the same shape (1/True = a completion token
  that counts). Valid tokens of a row must be contiguous (left or right padding both work).
  Values at padding positions never reach a result, even if they are NaN or huge.
- Registered in ADVANTAGE_ESTIMATORS with ``per_token=True``:
  ``fn(scores [B], mask, *, kl [B, T], kl_coef, group_size, values, gamma, lam)
  -> (advantages [B, T], returns [B, T])``, 0 at padding. Each sequence's score lands on its last
  token and every token pays ``kl_coef * kl`` (fleetrl.algos.shaping); ``values`` are the
  critic's at sampling time (estimators with meta ``needs_values``).
- Multi-turn episodes: ``skip`` [B, T] (optional, keyword) marks masked tokens *inside* a row that
  the environment wrote (observation tokens). GAE and returns pass over them: t+1 is the next
  policy token, and the carries go on through them. Any other masked token (padding, the prompt)
  resets the carries as before.
- Targets, not graph nodes: computed under ``no_grad``.
"""

from __future__ import annotations

import torch

from fleetrl.algos.advantages import grouped
from fleetrl.algos.reduce import check_token_shapes, masked_whiten
from fleetrl.algos.registry import ADVANTAGE_ESTIMATORS, OnlineAlgorithm, register_online_algorithm
from fleetrl.algos.shaping import token_rewards_with_kl


def _skip_mask(skip: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: observation tokens to pass over (never a valid token)."""
    if skip is None:
        return torch.zeros_like(valid)
    if skip.shape != valid.shape:
        raise ValueError(f"skip has shape {tuple(skip.shape)} but mask has {tuple(valid.shape)}; the "
                         "observation mask must share the mask's [batch, tokens] shape")
    return skip.bool() & ~valid


def _discounted_reverse_scan(x: torch.Tensor, valid: torch.Tensor, discount: float,
                             skip: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = x[t] + discount * out[next valid t] over each row, restarting at padding and
    passing over ``skip`` tokens."""
    skip = _skip_mask(skip, valid)
    out = torch.zeros_like(x)
    carry = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        # A padding step resets the carry: with right padding the last valid token then sees 0.
        stepped = torch.where(valid[:, t], x[:, t] + discount * carry, torch.zeros_like(carry))
        carry = torch.where(skip[:, t], carry, stepped)
        out[:, t] = torch.where(skip[:, t], torch.zeros_like(carry), carry)
    return out


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid tokens of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is
    the next valid token (``skip`` tokens in between are passed over) and both V and A are 0 after
    the last valid token (the episode ends there). Returns (advantages, returns = advantages +
    values), fp32, 0 at padding and skipped tokens.
    """
    valid = check_token_shapes(mask, rewards=rewards, values=values)
    skipped = _skip_mask(skip, valid)
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    r = torch.where(valid, rewards.float(), zero)
    v = torch.where(valid, values.float(), zero)

    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        ok = valid[:, t]
        # Padding resets both carries, so a right-padded row's last valid token bootstraps from 0;
        # an observation token leaves them as they are (t+1 of the turn before is the next turn).
        keep = skipped[:, t]
        next_adv = torch.where(keep, next_adv, torch.where(ok, adv_t, zero))
        next_value = torch.where(keep, next_value, torch.where(ok, v[:, t], zero))
        advantages[:, t] = torch.where(ok, adv_t, zero)
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns


@torch.no_grad()
def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       skip: torch.Tensor | None = None) -> torch.Tensor:
    """Discounted return-to-go G_t = r_t + gamma * G_{t+1} over valid tokens (t+1 passes over
    ``skip`` tokens); 0 at padding and skipped tokens."""
    valid = check_token_shapes(mask, token_rewards=token_rewards)
    r = torch.where(valid, token_rewards.float(), torch.zeros((), device=token_rewards.device))
    return _discounted_reverse_scan(r, valid, gamma, skip)


def _group_centered(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    s = grouped(scores, group_size)
    return (s - s.mean(dim=1, keepdim=True)).flatten()


@ADVANTAGE_ESTIMATORS.register("gae", per_token=True, needs_values=True)
@torch.no_grad()
def gae_advantages(
    scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor, kl_coef: float | torch.Tensor,
    group_size: int = 1, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's advantages: GAE over the KL-shaped token rewards with the critic's values (not
    whitened here: the caller decides, ppo.whiten_advantages). Returns (advantages, returns)."""
    if values is None:
        raise ValueError("gae advantages need the critic's values at sampling time (values=[B, T])")
    return gae(token_rewards_with_kl(scores, kl, mask, kl_coef), values, mask, gamma, lam, skip=skip)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", per_token=True)
@torch.no_grad()
def reinforce_pp_advantages(
    scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor, kl_coef: float | torch.Tensor,
    group_size: int = 1, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: batch-whitened discounted returns of the KL-shaped token rewards.
    Returns (advantages, the returns-to-go they whiten)."""
    returns = discounted_returns(token_rewards_with_kl(scores, kl, mask, kl_coef), mask, gamma, skip=skip)
    return masked_whiten(returns, mask), returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", per_token=True, min_group_size=2,
                               min_group_reason="the baseline is the group's mean score")
@torch.no_grad()
def reinforce_pp_baseline_advantages(
    scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor, kl_coef: float | torch.Tensor,
    group_size: int = 1, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
    skip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline: subtract each prompt's mean score, then as above."""
    return reinforce_pp_advantages(_group_centered(scores, group_size), mask, kl=kl, kl_coef=kl_coef,
                                   gamma=gamma, skip=skip)


_KL_IN_REWARD = {"learner.loss.kl_in": "reward"}  # the classic RLHF shaping; kl_in: loss when asked for

register_online_algorithm(OnlineAlgorithm(
    "ppo", advantage="gae", critic=True, section="ppo", defaults=_KL_IN_REWARD,
    summary="PPO (Ouyang et al. 2022): critic, GAE over KL-shaped token rewards"))
register_online_algorithm(OnlineAlgorithm(
    "reinforce_pp", advantage="reinforce_pp", section="reinforce_pp", defaults=_KL_IN_REWARD,
    summary="REINFORCE++ (Hu 2025): whitened returns of KL-shaped token rewards, no critic"))
register_online_algorithm(OnlineAlgorithm(
    "reinforce_pp_baseline", advantage="reinforce_pp_baseline", section="reinforce_pp",
    defaults=_KL_IN_REWARD,
    summary="REINFORCE++ with the group's mean score as baseline"))
