"""The critic's clipped value loss and how well it explains the returns.

Conventions
- ``values``, ``old_values`` (at sampling time), ``returns`` and ``mask`` are ``[B, T]``;
  padding never reaches the loss. Statistics are detached 0-d tensors.
"""

from __future__ import annotations

import torch

from fleetrl.algos.reduce import aggregate, masked_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2).

    clip=None disables clipping. Stats: vf_clip_frac (fraction of valid tokens where the clipped
    term was strictly larger).
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}")
    unclipped = (values - returns) ** 2
    if clip is None:
        loss_mat = 0.5 * unclipped
        clipped_taken = torch.zeros_like(mask, dtype=torch.bool)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clipped - returns) ** 2
        loss_mat = 0.5 * torch.maximum(unclipped, clipped)
        clipped_taken = clipped > unclipped
    loss = aggregate(loss_mat, mask, agg)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean(clipped_taken.float(), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over valid tokens (1 = perfect critic, 0 = no better than a constant).

    Returns 0 when the returns have no variance (nothing to explain).
    """
    values, returns = values.float(), returns.float()
    mean_r = masked_mean(returns, mask)
    var_r = masked_mean((returns - mean_r) ** 2, mask)
    resid = returns - values
    var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return torch.where(var_r > 0, 1.0 - var_resid / torch.where(var_r > 0, var_r, 1.0), 0.0)
