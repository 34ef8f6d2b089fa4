"""Per-token log-probs and entropy from a causal LM's logits.

Conventions
- ``logits`` are ``[B, T, V]`` exactly as the model returns them: ``logits[:, t]`` predicts token
  t+1. Outputs are fp32 ``[B, T]`` aligned with the tokens: ``out[:, t]`` is about token t, and
  ``out[:, 0] = 0`` (nothing predicts the first token). The shift happens here, nowhere else.
- Rows are processed one at a time, so no fp32 ``[B, T, V]`` tensor is materialized at once.
"""

from __future__ import annotations

import torch


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

    ``temperature`` must match the sampler's so the log-probs are those of the distribution that
    generated the tokens. Computed through logsumexp + gather (no full log-softmax).
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


def flat_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                          entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` [N] and (if asked) entropy under ``logits`` [N, V], both fp32 [N].

    The unshifted form, for callers that already paired each position's logits with the token it
    predicts (the learner's chunked head: a few hundred positions at a time).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, vocab] and targets [N]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lg = logits.float()
    if temperature != 1.0:
        lg = lg / temperature
    lse = torch.logsumexp(lg, dim=-1)
    logp = lg.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, None
    return logp, lse - (torch.softmax(lg, dim=-1) * lg).sum(dim=-1)
