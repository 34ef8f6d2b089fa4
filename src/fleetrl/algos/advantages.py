"""Group advantage estimators (one advantage per sample, from its prompt's group) and the online
algorithms built on them: GRPO, Dr.GRPO, RLOO.

Conventions
- Rewards are flat ``[N]`` with the ``group_size`` samples of one prompt contiguous
  (``[p0s0, p0s1, ..., p1s0, ...]``); the result is fp32 ``[N]`` in the same order.
- Registered in ADVANTAGE_ESTIMATORS with ``per_token=False``:
  ``fn(rewards, group_size, **options) -> advantages``; options an estimator takes are listed in
  its ``options`` meta (``scale``: rl.advantage_std).
- Advantages are targets, not graph nodes: computed under ``no_grad``.
"""

from __future__ import annotations

import torch

from fleetrl.algos.registry import ADVANTAGE_ESTIMATORS, OnlineAlgorithm, register_online_algorithm

GRPO_SCALES = ("group", "batch", "none")


def grouped(rewards: torch.Tensor, group_size: int, min_group: int = 1) -> torch.Tensor:
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


def _unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std; 0 (not NaN) when fewer than 2 elements, so a lone sample gets advantage 0."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.mean() if dim is None else x.mean(dim=dim, keepdim=True))
    return x.std(correction=1) if dim is None else x.std(dim=dim, keepdim=True, correction=1)


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: (r - group mean) / (std + eps), unbiased std.

    scale: "group" = std of each prompt's group, "batch" = std of all rewards in the batch,
    "none" = no division (Dr.GRPO). A group of size 1 has an undefined std and a centered
    reward of exactly 0, so its advantage is 0.
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed values: {', '.join(GRPO_SCALES)}")
    r = grouped(rewards, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (_unbiased_std(r, dim=1) + eps)
    elif scale == "batch":
        centered = centered / (_unbiased_std(r.flatten()) + eps)
    return centered.flatten()


_GROUP_MEAN = "its advantage is the reward minus the group's mean, which is 0 for a group of one: nothing would train"


@ADVANTAGE_ESTIMATORS.register("grpo", per_token=False, options=("scale",), min_group_size=2,
                               min_group_reason=_GROUP_MEAN)
def grpo(rewards: torch.Tensor, group_size: int, scale: str | None = None) -> torch.Tensor:
    """GRPO's group-normalized advantage; scale defaults to "group"."""
    return grpo_advantages(rewards, group_size, scale=scale or "group")


@ADVANTAGE_ESTIMATORS.register("drgrpo", per_token=False, options=("scale",), min_group_size=2,
                               min_group_reason=_GROUP_MEAN)
def drgrpo(rewards: torch.Tensor, group_size: int, scale: str | None = None) -> torch.Tensor:
    """Dr.GRPO: the group-centered reward, no std division (unless ``scale`` asks for one)."""
    return grpo_advantages(rewards, group_size, scale=scale or "none")


@ADVANTAGE_ESTIMATORS.register("rloo", per_token=False, min_group_size=2,
                               min_group_reason="the baseline leaves one sample out")
@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i minus the mean reward of the other group_size-1 samples of the same prompt."""
    r = grouped(rewards, group_size, min_group=2)
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others_mean).flatten()


register_online_algorithm(OnlineAlgorithm(
    "grpo", advantage="grpo", summary="GRPO (Shao et al. 2024): group-normalized rewards, PPO clip"))
register_online_algorithm(OnlineAlgorithm(
    "drgrpo", advantage="drgrpo", summary="Dr.GRPO (Liu et al. 2025): group-centered rewards, no std"))
register_online_algorithm(OnlineAlgorithm(
    "rloo", advantage="rloo", summary="RLOO (Ahmadian et al. 2024): leave-one-out baseline"))
