"""Reward shaping with a KL penalty: the one place a score and a KL estimate become rewards.

Conventions
- ``scores`` are sequence rewards ``[B]``; ``kl`` is a per-token KL estimate ``[B, T]`` (policy
  vs reference, fleetrl.algos.kl); ``mask`` ``[B, T]`` marks completion tokens, contiguous per row.
- Every valid token is charged ``-kl_coef * kl``; padding gets exactly 0, whatever ``kl`` holds.
- Targets, not graph nodes: computed under ``no_grad``.

Per-token algorithms (ppo, reinforce_pp*) put the score on the last token of the shaped rewards
(``token_rewards_with_kl``); group algorithms with ``kl_in: reward`` use the same rewards summed
over the sequence (``sequence_rewards_with_kl``), so the two can never disagree.
"""

from __future__ import annotations

import torch

from fleetrl.algos.reduce import check_token_shapes


@torch.no_grad()
def kl_penalty(kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor) -> torch.Tensor:
    """-kl_coef * kl on every valid token, 0 at padding. fp32 [B, T]."""
    valid = check_token_shapes(mask, kl=kl)
    return torch.where(valid, -kl_coef * kl.float(), torch.zeros((), dtype=torch.float32, device=kl.device))


def _check_scores(scores: torch.Tensor, mask: torch.Tensor) -> None:
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be [batch]={mask.shape[0]}, got shape {tuple(scores.shape)}")


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last valid token; raises for a row with none."""
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
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """Per-token reward [B, T]: -kl_coef * kl on every valid token, plus scores[b] on the last one."""
    _check_scores(scores, mask)
    rewards = kl_penalty(kl, mask, kl_coef)
    last = last_valid_index(mask.bool())
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float()
    return rewards


@torch.no_grad()
def sequence_rewards_with_kl(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """[B]: each score minus kl_coef * its sequence's summed KL (the token rewards, summed).

    Unlike ``token_rewards_with_kl`` an empty completion is fine: it pays no penalty.
    """
    _check_scores(scores, mask)
    return scores.float() + kl_penalty(kl, mask, kl_coef).sum(dim=-1)
