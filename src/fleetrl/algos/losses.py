"""Loss functions of every algorithm: pure torch, tensors in, tensors out.

Conventions
- Per-token tensors are ``[B, T]`` with a ``mask`` of the same shape (1/True = a completion token
  that counts; float masks act as weights). Padding values never reach a result or a gradient,
  even if they are NaN or huge.
- Statistics are returned as detached 0-d tensors (no host sync; call ``.item()`` when logging).
- Preference losses are UNREDUCED: one value per example, shape ``[B]``; the trainer reduces.
"""

from __future__ import annotations

import torch

from fleetrl.algos.registry import POLICY_LOSSES

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
# exp() of a log-ratio beyond this overflows fp32 quickly; ratios of e^20 mean the sample is useless anyway.
LOG_RATIO_CLAMP = 20.0


# ---------------------------------------------------------------------------------------------
# log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, tokens, vocab], got shape {tuple(logits.shape)}")
    if input_ids is not None and input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"input_ids shape {tuple(input_ids.shape)} does not match logits' [batch, tokens] "
            f"{tuple(logits.shape[:2])}; pass the logits of the same sequences, unshifted"
        )


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0. fp32, [B, T].

    ``logits[:, t]`` is the model output at position t (it predicts token t+1), as a causal LM
    returns it; the shift happens here. ``temperature`` must match the sampler's so the log-probs
    are those of the distribution that generated the tokens. Rows are processed one at a time
    and through logsumexp + gather, so no fp32 [B, T, V] log-softmax is materialized at once.
    """
    _check_logits(logits, input_ids)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = logits.new_zeros(input_ids.shape, dtype=torch.float32)
    if logits.shape[1] < 2:
        return out
    rows = []
    for b in range(logits.shape[0]):
        lg = logits[b, :-1].float()
        if temperature != 1.0:
            lg = lg / temperature
        picked = lg.gather(-1, input_ids[b, 1:].long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(lg, dim=-1))
    # cat (not in-place writes) keeps autograd happy.
    return torch.cat([out[:, :1], torch.stack(rows)], dim=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the distribution that predicted token t, aligned like token_logprobs.

    out[:, t] = H(softmax(logits[:, t-1])) and out[:, 0] = 0. fp32, [B, T]. Divide the logits by
    the sampling temperature first if you want the entropy of the sampling distribution.
    """
    _check_logits(logits)
    first = logits.new_zeros(logits.shape[:1] + (1,), dtype=torch.float32)
    if logits.shape[1] < 2:
        return logits.new_zeros(logits.shape[:2], dtype=torch.float32)
    rows = []
    for b in range(logits.shape[0]):
        lg = logits[b, :-1].float()
        # H = logsumexp(z) - sum_i p_i z_i; avoids computing log p for every vocab entry.
        p = torch.softmax(lg, dim=-1)
        rows.append(torch.logsumexp(lg, dim=-1) - (p * lg).sum(dim=-1))
    return torch.cat([first, torch.stack(rows)], dim=1)


# ---------------------------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------------------------


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * mask with padding forced to exactly 0 first, so NaN/inf padding cannot leak (0 * inf = NaN)."""
    if x.shape != mask.shape:
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match mask shape {tuple(mask.shape)}")
    keep = mask.bool()
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x if mask.dtype == torch.bool else x * mask.to(x.dtype)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (num is 0 there too), with finite gradients everywhere."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = _masked(x, mask)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over valid entries; 0 (not NaN) where there are none."""
    den = mask.to(x.dtype if x.is_floating_point() else torch.float32)
    den = den.sum() if dim is None else den.sum(dim=dim)
    return _safe_div(masked_sum(x, mask, dim), den)


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


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman's k1/k2/k3).

    k1 = logp - ref (unbiased, can be negative); k2 = 0.5 * (logp - ref)^2;
    k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased and >= 0); its log-ratio is clamped to
    +-LOG_RATIO_CLAMP so exp never overflows. Not masked: reduce with the mask afterwards.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; allowed values: {', '.join(KL_KINDS)}")


# ---------------------------------------------------------------------------------------------
# PPO policy and value losses
# ---------------------------------------------------------------------------------------------


def _token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


@POLICY_LOSSES.register("ppo")
def policy_loss(
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
    The log-ratio is clamped to +-LOG_RATIO_CLAMP before exp.

    Stats (detached 0-d tensors, over valid tokens): clip_frac (the clipped branch was strictly
    larger), dual_clip_frac, approx_kl = mean k3 estimate of KL(old || new) from the old policy's
    samples, i.e. mean(exp(logp-old) - (logp-old) - 1), ratio_mean, ratio_max (0 with no valid token).
    """
    valid = mask.bool()
    for name, t in (("logp", logp), ("old_logp", old_logp)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but mask has {tuple(mask.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {dual_clip}")
    adv = _token_advantages(advantages, mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero the padding's log-ratio and advantage up front: exp(garbage) = inf would poison gradients.
    log_ratio = torch.where(valid, logp - old_logp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(valid, adv.to(logp.dtype), zero)
    ratio = torch.exp(log_ratio)

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    dual_taken = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_taken = (adv < 0) & (loss_mat > cap)
        loss_mat = torch.where(dual_taken, cap, loss_mat)
    loss = aggregate(loss_mat, mask, agg)

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "dual_clip_frac": masked_mean(dual_taken.float(), mask),
            "approx_kl": masked_mean(kl_estimate(old_logp.detach(), logp.detach(), "k3"), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
            # ratio > 0, so padding at 0 never wins and an all-padding batch reports 0.
            "ratio_max": torch.where(valid, ratio.detach(), zero).max(),
        }
    return loss, stats


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
    term was strictly larger), detached 0-d tensor.
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

    Returns 0 when the returns have no variance (nothing to explain). Detached 0-d tensor.
    """
    values, returns = values.float(), returns.float()
    mean_r = masked_mean(returns, mask)
    var_r = masked_mean((returns - mean_r) ** 2, mask)
    resid = returns - values
    var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return torch.where(var_r > 0, 1.0 - var_resid / torch.where(var_r > 0, var_r, 1.0), 0.0)
