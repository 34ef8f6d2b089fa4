"""Packing padded rows of different lengths into fewer rows, and mapping per-token results back.

A sample's real tokens (``attention_mask == 1``, contiguous) are copied back to back into packed
rows no longer than the longest sample; position ids restart at 0 for each sample, and the forward
gets no 2-D attention mask, so transformers (``masking_utils.find_packed_sequence_indices``) keeps
attention inside each sample: a block-diagonal causal mask on CPU/sdpa, varlen kernels with
flash attention. Per-token outputs of the packed rows are scattered back to the padded layout
(``Packed.unpack``, differentiable), so losses are computed exactly as on the padded batch.

Pure torch, no model: the plan (first-fit over decreasing lengths) and the index maps are tested
alone; learner/forward.py runs the model on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fleetrl.core.packing import TooLong, first_fit


def pack_plan(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per packed row: first fit over decreasing lengths (ties keep input order),
    each row at most `capacity` tokens. Deterministic; every sample lands in exactly one row."""
    try:
        return first_fit(lengths, capacity)
    except TooLong as e:
        raise ValueError(f"pack_plan: sample {e.index} has {e.length} tokens, "
                         f"more than the row capacity {capacity}") from None


@dataclass
class Packed:
    """Packed rows of a [B, T] batch and the map back (flat indices into [B*T] and [R*W])."""

    input_ids: torch.Tensor  # [R, W], pad id 0 after the last sample of a row
    attention_mask: torch.Tensor  # [R, W], 1 on packed tokens
    position_ids: torch.Tensor  # [R, W], restarting at 0 per sample; padding keeps counting
    src: torch.Tensor  # flat positions in [B*T] of the packed tokens
    dst: torch.Tensor  # the same tokens' flat positions in [R*W]
    shape: tuple[int, int]  # (B, T)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[R, W] per-token values -> [B, T] (0 where the padded batch has padding); keeps autograd."""
        b, t = self.shape
        flat = values.reshape(-1)[self.dst.to(values.device)]
        return values.new_zeros(b * t).index_copy(0, self.src.to(values.device), flat).view(b, t)


def sample_spans(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real column, real length) of each row; real tokens must be contiguous."""
    real = attention_mask.bool()
    lengths = real.sum(-1)
    first = torch.where(lengths > 0, real.int().argmax(-1), torch.zeros_like(lengths))
    cols = torch.arange(real.shape[1]).unsqueeze(0)
    contiguous = (cols >= first.unsqueeze(1)) & (cols < (first + lengths).unsqueeze(1))
    if not torch.equal(contiguous, real):
        bad = int((contiguous != real).any(-1).nonzero()[0])
        raise ValueError(f"packing needs each row's real tokens contiguous (padding only before or after); "
                         f"row {bad} of attention_mask has a hole: set learner.pack_samples: false")
    return first, lengths


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None) -> Packed | None:
    """The rows packed (see the module doc), or None when packing saves no row (nothing to gain).

    `capacity` defaults to the longest sample, so a packed row is never wider than the padded batch.
    """
    b, t = input_ids.shape
    first, lengths = sample_spans(attention_mask.cpu())
    lens = lengths.tolist()
    cap = int(capacity or max(lens, default=0))
    if cap == 0:
        return None
    plan = pack_plan(lens, cap)
    if len(plan) >= b:
        return None
    width = max(sum(lens[i] for i in row) for row in plan)
    src, dst, pos = [], [], torch.zeros(len(plan), width, dtype=torch.long)
    for r, row in enumerate(plan):
        off = 0
        for i in row:
            n, s = lens[i], int(first[i])
            src.append(torch.arange(i * t + s, i * t + s + n))
            dst.append(torch.arange(r * width + off, r * width + off + n))
            pos[r, off : off + n] = torch.arange(n)
            off += n
        # Padding keeps counting, so it never starts a new sample (its outputs are never read).
        pos[r, off:] = torch.arange(pos[r, off - 1] + 1, pos[r, off - 1] + 1 + width - off) if off else 0
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    ids = torch.zeros(len(plan) * width, dtype=input_ids.dtype)
    ids[dst_t] = input_ids.cpu().reshape(-1)[src_t]
    attn = torch.zeros(len(plan) * width, dtype=torch.long)
    attn[dst_t] = 1
    return Packed(ids.view(len(plan), width), attn.view(len(plan), width), pos, src_t, dst_t, (b, t))


def padding_share(attention_mask: torch.Tensor, pack: bool) -> float:
    """Share of the positions a forward sees that are padding: padded rows cut to their widest
    real span (what learner/forward.py runs), or the packed rows."""
    real = attention_mask.bool()
    total = int(real.sum())
    if total == 0:
        return 0.0
    packed = pack_rows(torch.zeros_like(attention_mask), attention_mask) if pack else None
    if packed is not None:
        return 1.0 - total / packed.attention_mask.numel()
    cols = real.any(0).nonzero().flatten()
    return 1.0 - total / (real.shape[0] * (int(cols[-1]) - int(cols[0]) + 1))
