"""Masked reductions every loss and estimator shares: sums, means, aggregation modes, whitening.

Conventions
- Per-token tensors are ``[B, T]`` with a ``mask`` of the same shape (1/True = a completion token
  that counts; float masks act as weights). Padding values never reach a result or a gradient,
  even if they are NaN or huge: they are replaced by 0 before any arithmetic (0 * inf = NaN).
- An empty mask gives 0, never NaN.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * mask with padding forced to exactly 0 first, so NaN/inf padding cannot leak."""
    if x.shape != mask.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match mask shape {tuple(mask.shape)}")
    keep = mask.bool()
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x if mask.dtype == torch.bool else x * mask.to(x.dtype)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (num is 0 there too), with finite gradients everywhere."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = masked(x, mask)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over valid entries; 0 (not NaN) where there are none."""
    den = mask.to(x.dtype if x.is_floating_point() else torch.float32)
    den = den.sum() if dim is None else den.sum(dim=dim)
    return safe_div(masked_sum(x, mask, dim), den)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over valid entries of a non-negative x (e.g. a ratio); 0 with no valid entry."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)).max()


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    - "token-mean": sum over all valid tokens / number of valid tokens.
    - "seq-mean-token-mean": mean over sequences of each sequence's token mean. Sequences with no
      valid token are left out of the mean over sequences.
    - "seq-mean-token-sum-norm": each sequence's token sum / T (= mask.shape[-1], a constant), then
      the mean over all B sequences (Dr.GRPO: no length normalization bias).
    A mask with no valid token gives 0.
    """
    if agg == "token-mean":
        return masked_mean(loss_mat, mask)
    if agg == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)
        has_tokens = mask.bool().any(dim=-1)
        return masked_mean(per_seq, has_tokens)
    if agg == "seq-mean-token-sum-norm":
        return (masked_sum(loss_mat, mask, dim=-1) / mask.shape[-1]).mean()
    raise ValueError(f"unknown agg {agg!r}; allowed values: {', '.join(AGG_MODES)}")


def check_token_shapes(mask: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
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


def expand_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages as [B, T]: one per sequence ([B]) is repeated on each of its tokens."""
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(
                f"advantages [B]={advantages.shape[0]} does not match the mask's batch {mask.shape[0]}"
            )
        return advantages.unsqueeze(-1).expand_as(mask)
    if advantages.shape != mask.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T]={tuple(mask.shape)}, got shape {tuple(advantages.shape)}"
        )
    return advantages


@torch.no_grad()
def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over valid tokens only.

    shift_mean=False adds the mean back (only the scale changes). Padding positions are 0.
    """
    valid = check_token_shapes(mask, x=x)
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


@torch.no_grad()
def masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, population std) over valid entries, as Python floats (for metrics)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return float(mean), float(var.sqrt())
