"""Advantage estimators and KL controllers: pure torch, tensors in, tensors out.

Conventions
- Sequence-level tensors are flat ``[N]``; group estimators expect the ``group_size`` samples of
  one prompt to be contiguous (``[p0s0, p0s1, ..., p1s0, ...]``).
- Per-token tensors are ``[B, T]`` with a ``mask`` of the same shape (1/True = a completion token
  that counts). Valid tokens of a row must be contiguous (left or right padding both work).
  Values at padding positions never reach a result, even if they are NaN or huge.
- Advantages and returns are targets, not graph nodes: they are computed under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

GRPO_SCALES = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int, min_group: int = 1) -> torch.Tensor:
    """View flat rewards as [num_prompts, group_size] after checking the shape."""
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be a flat [num_prompts*group_size] tensor, got shape {tuple(rewards.shape)}; "
            "flatten the per-prompt groups (contiguous) before calling"
        )
    if not isinstance(group_size, int) or group_size < min_group:
        raise ValueError(f"group_size must be an int >= {min_group}, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"len(rewards)={rewards.numel()} is not divisible by group_size={group_size}: every prompt "
            "must contribute exactly group_size samples (check the grouping / dropped samples)"
        )
    return rewards.float().view(-1, group_size)


def _check_token_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    """Check every per-token tensor matches mask's [B, T] shape; return mask as bool."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, tokens], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}; "
                "per-token tensors must share the mask's [batch, tokens] shape"
            )
    return mask.bool()


def _unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std; 0 (not NaN) when fewer than 2 elements, so a lone sample gets advantage 0."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.mean() if dim is None else x.mean(dim=dim, keepdim=True))
    return x.std(correction=1) if dim is None else x.std(dim=dim, keepdim=True, correction=1)


def _discounted_reverse_scan(x: torch.Tensor, valid: torch.Tensor, discount: float) -> torch.Tensor:
    """out[t] = x[t] + discount * out[next valid t] over each row, restarting at padding."""
    out = torch.zeros_like(x)
    carry = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        # A padding step resets the carry: with right padding the last valid token then sees 0.
        carry = torch.where(valid[:, t], x[:, t] + discount * carry, torch.zeros_like(carry))
        out[:, t] = carry
    return out


# ---------------------------------------------------------------------------------------------
# sequence-level (outcome reward) estimators
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: (r - group mean) / (std + eps), unbiased std.

    scale: "group" = std of each prompt's group, "batch" = std of all rewards in the batch,
    "none" = no division (Dr.GRPO). A group of size 1 has an undefined std and a centered
    reward of exactly 0, so its advantage is 0. Returns fp32 ``[N]``.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed values: {', '.join(GRPO_SCALES)}")
    r = _grouped(rewards, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (_unbiased_std(r, dim=1) + eps)
    elif scale == "batch":
        centered = centered / (_unbiased_std(r.flatten()) + eps)
    return centered.flatten()


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other group_size-1 samples of the same prompt."""
    r = _grouped(rewards, group_size, min_group=2)
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others_mean).flatten()


# Every entry maps (rewards [N], group_size) -> advantages [N].
ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "grpo": partial(grpo_advantages, scale="group"),
    "drgrpo": partial(grpo_advantages, scale="none"),
    "rloo": rloo_advantages,
}


# ---------------------------------------------------------------------------------------------
# per-token estimators
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid tokens of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where t+1 is
    the next valid token and both V and A are 0 after the last valid token (the episode ends
    there). Returns (advantages, returns = advantages + values), fp32, 0 at padding.
    """
    valid = _check_token_shapes(mask, rewards=rewards, values=values)
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
        # Padding resets both carries, so a right-padded row's last valid token bootstraps from 0.
        next_adv = torch.where(ok, adv_t, zero)
        next_value = torch.where(ok, v[:, t], zero)
        advantages[:, t] = next_adv
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns


@torch.no_grad()
def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted return-to-go G_t = r_t + gamma * G_{t+1} over valid tokens; 0 at padding."""
    valid = _check_token_shapes(mask, token_rewards=token_rewards)
    r = torch.where(valid, token_rewards.float(), torch.zeros((), device=token_rewards.device))
    return _discounted_reverse_scan(r, valid, gamma)


@torch.no_grad()
def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over valid tokens only.

    shift_mean=False adds the mean back (only the scale changes). Padding positions are 0.
    """
    valid = _check_token_shapes(mask, x=x)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    xf = torch.where(valid, x.float(), zero)
    n = valid.sum()
    if n == 0:
        return torch.zeros_like(xf)
    mean = xf.sum() / n
    sq = torch.where(valid, (xf - mean) ** 2, zero).sum()
    var = sq / (n - 1) if n > 1 else sq  # n == 1: var 0, the lone token whitens to 0
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, zero)


def _last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    empty = (last < 0).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"rows {empty.tolist()[:8]} have no valid token in mask, so their score has nowhere to go; "
            "drop empty completions before computing token rewards (and count them in the metrics)"
        )
    return last


@torch.no_grad()
def token_rewards_with_kl(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> torch.Tensor:
    """Per-token reward: -kl_coef * kl on every valid token, plus scores[b] on the last valid token.

    scores: [B] sequence scores; kl: [B, T] per-token KL estimate (policy vs reference).
    """
    valid = _check_token_shapes(mask, kl=kl)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be [batch]={mask.shape[0]}, got shape {tuple(scores.shape)}")
    zero = torch.zeros((), dtype=torch.float32, device=kl.device)
    rewards = torch.where(valid, -kl_coef * kl.float(), zero)
    last = _last_valid_index(valid)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float()
    return rewards


@torch.no_grad()
def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++: batch-whitened discounted returns of the KL-shaped token rewards."""
    rewards = token_rewards_with_kl(scores, kl, mask, kl_coef)
    return masked_whiten(reinforce_pp_returns(rewards, mask, gamma), mask)


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    group_size: int,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++ with a group baseline: subtract each prompt's mean score, then as above."""
    s = _grouped(scores, group_size)
    centered = (s - s.mean(dim=1, keepdim=True)).flatten()
    return reinforce_pp_advantages(centered, kl, mask, kl_coef, gamma)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Proportional controller (Ziegler et al. 2019) steering the observed KL towards `target`.

    value <- value * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
