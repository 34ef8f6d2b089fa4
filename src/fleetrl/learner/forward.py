"""Forward passes of one micro-batch: token log-probs, values, sequence log-probs, reward-model scores.

Plain functions of a model (a module, or a DeepSpeed engine, which is called like one) and a device;
no DeepSpeed import, so objectives run them on plain modules in tests.

Sequence layout (shared with the rollout side): a row is prompt + completion, padded on either
side, `attention_mask` marks real tokens, and per-token tensors (`loss_mask`, `old_logprobs`,
`advantages`, `ref_logprobs`, the returned log-probs) are aligned with `input_ids`:
value[:, t] belongs to token t, predicted from tokens < t. Position ids count real tokens
only, as vLLM numbers them, so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fleetrl.algos.logprobs import entropy_from_logits, flat_logprobs_entropy, token_logprobs
from fleetrl.algos.reduce import masked_sum
from fleetrl.learner.packing import pack_rows

Model = Callable[..., Any]


def model_inputs(
    ids: torch.Tensor, attn: torch.Tensor, device: torch.device, position_ids: torch.Tensor | None = None
) -> tuple[int, int, dict[str, Any], torch.Tensor] | None:
    """(lo, hi, model kwargs, attention mask) of a micro-batch with the columns that are padding in
    every row cut ([lo, hi) kept, on the device); None when every column is padding.

    Position ids count real tokens (as vLLM numbers them). Given `position_ids` (packed rows:
    positions restart at 0 for each packed sequence) are passed with no 2-D attention mask, so
    transformers builds a block-diagonal causal mask from them.
    """
    cols = attn.bool().any(0).nonzero().flatten()
    if cols.numel() == 0:
        return None
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    ids_t = ids[:, lo:hi].to(device)
    attn_t = attn[:, lo:hi].to(device).long()
    if position_ids is None:
        kwargs = {"input_ids": ids_t, "attention_mask": attn_t,
                  "position_ids": (attn_t.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
    else:
        kwargs = {"input_ids": ids_t, "attention_mask": None,
                  "position_ids": position_ids[:, lo:hi].to(device).long(), "use_cache": False}
    return lo, hi, kwargs, attn_t


# Positions per chunk of the log-prob head (learner.logprob_chunk_tokens): a chunk holds [chunk, V]
# fp32 logits (1024 x 49k = 200 MB) instead of the micro-batch's [b * T, V].
DEFAULT_CHUNK_TOKENS = 1024
# Models whose forward changes the head's output (soft-capping, scaling): their logits are not the
# head's, so they take the unchunked path.
_LOGIT_CHANGING_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_of(fn: Model) -> torch.nn.Module | None:
    """The Hugging Face causal LM under `fn` (a DeepSpeed engine, a PEFT model, the reference's
    adapter-off call, or the module itself), or None when there is none whose head can be chunked."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(fn, "call") and not isinstance(fn, torch.nn.Module):  # lora.AdapterDisabled
            fn = fn.call
        elif isinstance(fn, torch.nn.Module) and isinstance(fn._modules.get("module"), torch.nn.Module):
            # DeepSpeedEngine: tested by its child, since it forwards attribute lookups (such as
            # get_output_embeddings) to the model it wraps.
            fn = fn._modules["module"]
        elif hasattr(fn, "get_base_model"):  # peft.PeftModel
            fn = fn.get_base_model()
        else:
            break
    if not isinstance(fn, torch.nn.Module) or not hasattr(fn, "get_output_embeddings"):
        return None
    head = fn.get_output_embeddings()
    config = getattr(fn, "config", None)
    if not isinstance(head, torch.nn.Linear) or any(getattr(config, k, None) not in (None, 1, 1.0)
                                                    for k in _LOGIT_CHANGING_CONFIG):
        return None
    if not any(child is head for child in fn._modules.values()):
        return None
    return fn


class _ChunkedHead(torch.nn.Module):
    """Stands in for a causal LM's output head for one forward: from the hidden states [b, T, H] it
    returns [b, T, 2] = (log-prob of each token, entropy before it), aligned like token_logprobs,
    computing the head chunk by chunk. With grad, each chunk is checkpointed: its logits are
    recomputed in the backward pass instead of kept, so no [b * T, V] tensor ever exists."""

    def __init__(self, head: torch.nn.Module, input_ids: torch.Tensor, temperature: float, entropy: bool,
                 chunk_tokens: int):
        super().__init__()
        self.head, self.input_ids = head, input_ids
        self.temperature, self.entropy, self.chunk_tokens = temperature, entropy, chunk_tokens

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp, ent = flat_logprobs_entropy(self.head(hidden), targets, self.temperature, self.entropy)
        return torch.stack([logp, ent if ent is not None else torch.zeros_like(logp)], dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, T, H = hidden.shape
        out = hidden.new_zeros((b, 1, 2), dtype=torch.float32)
        if T < 2:
            return out.expand(b, T, 2).contiguous()
        flat_h = hidden[:, :-1].reshape(-1, H)
        flat_t = self.input_ids[:, 1:].reshape(-1).to(hidden.device)
        grad = torch.is_grad_enabled() and flat_h.requires_grad
        parts = []
        for i in range(0, flat_h.shape[0], self.chunk_tokens):
            h, t = flat_h[i : i + self.chunk_tokens], flat_t[i : i + self.chunk_tokens]
            parts.append(checkpoint(self._chunk, h, t, use_reentrant=False) if grad else self._chunk(h, t))
        return torch.cat([out, torch.cat(parts).view(b, T - 1, 2)], dim=1)


@contextmanager
def chunked_head(model: torch.nn.Module, input_ids: torch.Tensor, temperature: float, entropy: bool,
                 chunk_tokens: int) -> Iterator[None]:
    """While inside, `model`'s forward returns `_ChunkedHead` outputs as its logits."""
    head = model.get_output_embeddings()
    name = next(k for k, child in model._modules.items() if child is head)
    model._modules[name] = _ChunkedHead(head, input_ids, temperature, entropy, chunk_tokens)
    try:
        yield
    finally:
        model._modules[name] = head


def token_logps(
    fn: Model,
    ids: torch.Tensor,
    attn: torch.Tensor,
    device: torch.device,
    temperature: float = 1.0,
    entropy: str = "no",
    position_ids: torch.Tensor | None = None,
    pack: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aligned log-probs [b, T] (and entropy if asked: "no" | "detached" | "grad") of one micro-batch.

    Columns that are padding in every row are cut before the forward and restored as 0 after.
    A token's value is 0 unless it and the token before it are real (it has context).
    See `model_inputs` for `position_ids`. `pack`: run the samples packed into fewer rows
    (learner/packing.py) when that saves rows; the results are the padded path's. `chunk_tokens` > 0:
    the output head runs that many positions at a time (`chunked_head`), so the micro-batch's logits
    are never held whole, in the forward or the backward; 0 (or a model whose head cannot be split
    off) computes the full logits. Both give the same values and gradients.
    """
    if pack and position_ids is None:
        packed = pack_rows(ids, attn)
        if packed is not None:
            logp, ent = token_logps(fn, packed.input_ids, packed.attention_mask, device, temperature, entropy,
                                    position_ids=packed.position_ids, chunk_tokens=chunk_tokens)
            # A sample's first token was predicted from the sample before it in its packed row.
            real = attn.to(device).bool()
            ctx = real & F.pad(real, (1, 0))[:, :-1]
            zero = torch.zeros((), device=device)
            return (torch.where(ctx, packed.unpack(logp), zero),
                    None if ent is None else torch.where(ctx, packed.unpack(ent), zero))
    b, T = ids.shape
    inputs = model_inputs(ids, attn, device, position_ids)
    if inputs is None:
        zeros = torch.zeros(b, T, device=device)
        return zeros, (zeros.clone() if entropy != "no" else None)
    lo, hi, kwargs, attn_t = inputs
    has_ctx = attn_t.bool() & F.pad(attn_t.bool(), (1, 0))[:, :-1]
    model = causal_lm_of(fn) if chunk_tokens > 0 else None
    if model is not None:
        want_ent = entropy != "no"
        with chunked_head(model, kwargs["input_ids"], temperature, want_ent, chunk_tokens):
            stats = fn(**kwargs).logits
        zero = torch.zeros((), device=stats.device)
        logp = torch.where(has_ctx, stats[..., 0], zero)
        ent = None
        if want_ent:
            ent = torch.where(has_ctx, stats[..., 1], zero)
            ent = F.pad(ent if entropy == "grad" else ent.detach(), (lo, T - hi))
        return F.pad(logp, (lo, T - hi)), ent
    logits = fn(**kwargs).logits
    zero = torch.zeros((), device=logits.device)
    logp = torch.where(has_ctx, token_logprobs(logits, kwargs["input_ids"], temperature), zero)
    ent = None
    if entropy != "no":
        scaled = logits if temperature == 1.0 else logits / temperature
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            ent = torch.where(has_ctx, entropy_from_logits(scaled), zero)
        ent = F.pad(ent, (lo, T - hi))
    return F.pad(logp, (lo, T - hi)), ent


def align_values(head_out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position head outputs [B, T] -> values aligned with tokens [B, T].

    out[:, t] = head_out[:, t-1] where token t and token t-1 are real; 0 elsewhere (column 0,
    padding, the first real token of a left-padded row).
    """
    if head_out.shape != attention_mask.shape:
        raise ValueError(f"head outputs {tuple(head_out.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be [batch, tokens]")
    real = attention_mask.bool()
    has_ctx = real & F.pad(real, (1, 0))[:, :-1]
    shifted = F.pad(head_out, (1, 0))[:, :-1]
    return torch.where(has_ctx, shifted, torch.zeros((), dtype=head_out.dtype, device=head_out.device))


def token_values(fn: Model, ids: torch.Tensor, attn: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Aligned values [b, T] (fp32, on the device) of one micro-batch under a value model."""
    b, T = ids.shape
    inputs = model_inputs(ids, attn, device)
    if inputs is None:
        return torch.zeros(b, T, device=device)
    lo, hi, kwargs, attn_t = inputs
    head = fn(**kwargs).logits[..., 0].float()
    return F.pad(align_values(head, attn_t), (lo, T - hi))


def sequence_logps(fn: Model, rows: dict[str, torch.Tensor], device: torch.device,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [b] and completion token counts [b] of rows (input_ids,
    attention_mask, loss_mask, optional position_ids), on the device."""
    logp, _ = token_logps(fn, rows["input_ids"], rows["attention_mask"], device, 1.0,
                          position_ids=rows.get("position_ids"), chunk_tokens=chunk_tokens)
    mask = (rows["loss_mask"].float() * rows["attention_mask"].float()).to(device)
    return masked_sum(logp, mask, dim=-1), mask.sum(-1)


def sequence_scores(fn: Model, rows: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A reward model's scalar score per row [b] (rows right-padded with the pad id)."""
    ids, attn = rows["input_ids"], rows["attention_mask"]
    cols = attn.bool().any(0).nonzero().flatten()
    hi = int(cols[-1]) + 1 if cols.numel() else 1
    ids_t, attn_t = ids[:, :hi].to(device), attn[:, :hi].to(device).long()
    positions = (attn_t.cumsum(-1) - 1).clamp(min=0)
    out = fn(input_ids=ids_t, attention_mask=attn_t, position_ids=positions, use_cache=False)
    return out.logits[:, 0].float()


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive row slices of `size` rows (the last may be shorter)."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]
