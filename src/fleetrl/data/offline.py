"""Rows -> token ids -> padded batches for the offline trainers (SFT, RM, DPO, IPO, KTO, ORPO, SimPO,
offline PPO).

Pure Python and torch (no Ray, no DeepSpeed). A sequence is prompt tokens then completion tokens,
tokenized separately (the prompt of a pair is then the same token for token on both sides, and
matches what the rollout fleet is given). Batches are right-padded; `loss_mask` marks the tokens
whose log-probs count (see learner/offline.py for the layouts).

Unpaired feedback (KTO, offline PPO) comes from labelled rows, from preference rows (both answers,
or one per prompt with `one_y_per_x`) or from scored rows (a threshold makes the label, an optional
weighting function each example's loss weight); see `FeedbackConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fleetrl.core.packing import TooLong, first_fit
from fleetrl.data.rows import (
    DataError,
    PreferenceRow,
    Row,
    SFTRow,
    UnpairedRow,
    render_completion,
    render_prompt,
)
from fleetrl.learner.offline_config import UNPAIRED_ALGORITHMS, FeedbackConfig


@dataclass(frozen=True)
class Seq:
    prompt: tuple[int, ...]
    completion: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass(frozen=True)
class Pair:
    chosen: Seq
    rejected: Seq
    margin: float | None = None


@dataclass(frozen=True)
class Labeled:
    """An unpaired example (KTO, offline PPO): one completion, desirable or not, and the weight
    of its loss (1 unless scores are weighted); `score` is the row's score when it had one."""

    seq: Seq
    desirable: bool
    weight: float = 1.0
    score: float | None = None


Example = Seq | Pair | Labeled


@dataclass
class EncodeStats:
    """What encoding changed or left out; printed at start and written to the metrics."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0  # completions cut to fit max_length (rm: sequences cut on the left)
    skipped_too_long: int = 0  # the prompt alone leaves no room for a completion token
    skipped_empty: int = 0  # the completion has no token
    # Unpaired examples (kto, offline_ppo) only: how many of each class, and how many completions
    # one_y_per_x left out (one per preference row).
    desirable: int | None = None
    undesirable: int | None = None
    one_y_per_x_dropped: int | None = None

    def as_metrics(self, prefix: str) -> dict[str, int]:
        out = {f"{prefix}/rows": self.rows, f"{prefix}/examples": self.examples,
               f"{prefix}/truncated": self.truncated, f"{prefix}/skipped_too_long": self.skipped_too_long,
               f"{prefix}/skipped_empty": self.skipped_empty}
        for key in ("desirable", "undesirable", "one_y_per_x_dropped"):
            if getattr(self, key) is not None:
                out[f"{prefix}/{key}"] = getattr(self, key)
        return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Unpaired feedback: the conversions, as pure functions


def one_y_per_x_choices(n: int, seed: int) -> list[bool]:
    """For n preference rows in order: True = keep the chosen answer (desirable), False = keep the
    rejected one. Each is a fair coin from a stream seeded by `seed` only (same data, same picks)."""
    rng = random.Random(f"fleetrl-one-y-per-x:{seed}")
    return [rng.random() < 0.5 for _ in range(n)]


def score_is_desirable(score: float, threshold: float) -> bool:
    """A scored completion is desirable when its score reaches the threshold (ties are desirable)."""
    return score >= threshold


def score_weights(scores: Sequence[float], threshold: float, weighting: str) -> list[float]:
    """Per-example loss weights: "none" -> 1 each; "distance" -> |score - threshold| scaled so the
    weights average 1 over `scores` (confident ratings count more, borderline ones less)."""
    if weighting == "none":
        return [1.0] * len(scores)
    if weighting != "distance":
        raise ValueError(f"score weighting must be 'none' or 'distance', got {weighting!r}")
    dist = [abs(s - threshold) for s in scores]
    mean = sum(dist) / len(dist) if dist else 0.0
    if mean == 0.0:
        raise DataError(
            f"score_weighting 'distance': every score equals the threshold {threshold}, so every weight "
            "would be 0; move the threshold or use score_weighting: none"
        )
    return [d / mean for d in dist]


class Encoder:
    """Turns rows into examples for one algorithm, with the run's tokenizer and length limit.

    `feedback` (kto, offline_ppo) says how preference and scored rows become labelled examples;
    `seed` seeds its one-y-per-x picks.
    """

    def __init__(self, algorithm: str, tokenizer: Any, max_length: int, apply_chat_template: bool = True,
                 margin_key: str | None = None, feedback: FeedbackConfig | None = None, seed: int = 0):
        self.algorithm, self.tokenizer, self.max_length = algorithm, tokenizer, max_length
        self.act = apply_chat_template
        self.margin_key = margin_key
        self.feedback = feedback if feedback is not None else FeedbackConfig()
        self.seed = seed
        self._keep_chosen: list[bool] = []

    def seq(self, prompt_text: str, completion_text: str, stats: EncodeStats) -> Seq | None:
        """prompt + completion ids, the completion cut on the right to fit; None when skipped (counted)."""
        prompt = _ids(self.tokenizer, prompt_text)
        completion = _ids(self.tokenizer, completion_text)
        if not completion:
            stats.skipped_empty += 1
            return None
        if len(prompt) >= self.max_length:
            stats.skipped_too_long += 1
            return None
        if len(prompt) + len(completion) > self.max_length:
            completion = completion[: self.max_length - len(prompt)]
            stats.truncated += 1
        return Seq(tuple(prompt), tuple(completion))

    def rm_seq(self, row: PreferenceRow, which: str, stats: EncodeStats) -> Seq | None:
        """The text the reward service scores: the rendered prompt + the completion text, tokenized
        as one string with the tokenizer's own special tokens, cut on the LEFT (the head reads the end)."""
        content = getattr(row, which)
        completion = content if isinstance(content, str) else render_completion(
            row, self.tokenizer, which, self.act)
        ids = list(self.tokenizer(render_prompt(row, self.tokenizer, self.act) + completion)["input_ids"])
        if not ids:
            stats.skipped_empty += 1
            return None
        if len(ids) > self.max_length:
            ids = ids[-self.max_length :]
            stats.truncated += 1
        return Seq((), tuple(ids))

    def encode(self, rows: Sequence[Row]) -> tuple[list[Example], EncodeStats]:
        stats = EncodeStats(rows=len(rows))
        unpaired = self.algorithm in UNPAIRED_ALGORITHMS
        if unpaired and self.feedback.one_y_per_x:
            n_pairs = sum(isinstance(r, PreferenceRow) for r in rows)
            self._keep_chosen = one_y_per_x_choices(n_pairs, self.seed)[::-1]  # popped in row order
            stats.one_y_per_x_dropped = n_pairs
        out: list[Example] = []
        for row in rows:
            out.extend(self._encode_row(row, stats))
        if unpaired:
            fb = self.feedback
            if fb.score_key is not None and fb.score_weighting != "none" and out:
                weights = score_weights([e.score for e in out], fb.score_threshold, fb.score_weighting)
                out = [dataclasses.replace(e, weight=w) for e, w in zip(out, weights)]
            stats.desirable = sum(1 for e in out if e.desirable)
            stats.undesirable = len(out) - stats.desirable
        stats.examples = len(out)
        return out, stats

    def _encode_row(self, row: Row, stats: EncodeStats) -> list[Example]:
        algo = self.algorithm

        def prompt() -> str:
            return render_prompt(row, self.tokenizer, self.act)

        def completion(which: str) -> str:
            return render_completion(row, self.tokenizer, which, self.act)

        if algo == "sft":
            if not isinstance(row, SFTRow):
                raise _wrong_kind(row, algo, "sft rows (prompt + completion, or messages)")
            s = self.seq(prompt(), completion("completion"), stats)
            return [s] if s is not None else []
        if algo in UNPAIRED_ALGORITHMS:
            fb = self.feedback
            if fb.score_key is not None:
                if not isinstance(row, UnpairedRow | SFTRow):
                    raise _wrong_kind(row, algo, f"scored rows (prompt, completion, {fb.score_key})")
                score = self._score(row)
                s = self.seq(prompt(), completion("completion"), stats)
                good = score_is_desirable(score, fb.score_threshold)
                return [Labeled(s, good, score=score)] if s is not None else []
            if isinstance(row, UnpairedRow):
                s = self.seq(prompt(), completion("completion"), stats)
                return [Labeled(s, row.label)] if s is not None else []
            if isinstance(row, PreferenceRow):  # a pair gives one desirable and one undesirable example
                sides = (("chosen", True), ("rejected", False))
                if fb.one_y_per_x:  # ... or just one of the two
                    sides = sides[:1] if self._keep_chosen.pop() else sides[1:]
                text = prompt()
                out = []
                for which, good in sides:
                    s = self.seq(text, completion(which), stats)
                    if s is not None:
                        out.append(Labeled(s, good))
                return out
            raise _wrong_kind(row, algo, "unpaired rows (prompt, completion, label) or preference rows")
        if not isinstance(row, PreferenceRow):
            raise _wrong_kind(row, algo, "preference rows (prompt, chosen, rejected)")
        if algo == "rm":
            c, r = self.rm_seq(row, "chosen", stats), self.rm_seq(row, "rejected", stats)
        else:
            text = prompt()
            c, r = self.seq(text, completion("chosen"), stats), self.seq(text, completion("rejected"), stats)
        if c is None or r is None:
            return []
        return [Pair(c, r, self._margin(row))]

    def _score(self, row: UnpairedRow | SFTRow) -> float:
        return row_number(row, self.feedback.score_key, f"{self.algorithm}.score_key",
                          f"unset {self.algorithm}.score_key to read boolean labels")

    def _margin(self, row: PreferenceRow) -> float | None:
        if self.margin_key is None:
            return None
        return row_number(row, self.margin_key, "rm.margin_key", "unset rm.margin_key")


def row_number(row: Row, key: str, setting: str, instead: str) -> float:
    """The finite number in column ``key`` of ``row`` (``setting`` names it); DataError naming the row
    otherwise (``instead``: what else the user can do)."""
    value = row.extra.get(key)
    if type(value).__module__ == "numpy":
        value = value.item()
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{row.source}: {setting} is '{key}' but the row's '{key}' is {value!r}; every row needs "
                        f"a finite number there (or {instead})")
    return float(value)


def _wrong_kind(row: Row, algorithm: str, needs: str) -> DataError:
    kind = {PreferenceRow: "preference", UnpairedRow: "unpaired", SFTRow: "sft"}.get(type(row), "prompt")
    return DataError(
        f"{row.source}: {algorithm} trains on {needs}, but this row is a {kind} row; point data.path at "
        f"such data or set data.kind / the data.*_key names so the columns are read as {needs.split(' (')[0]}"
    )


def kto_counts(examples: Sequence[Labeled]) -> tuple[int, int]:
    """(desirable, undesirable) counts."""
    n_d = sum(1 for e in examples if e.desirable)
    return n_d, len(examples) - n_d


# ---------------------------------------------------------------------------------------------
# Padding


def collate_rows(seqs: Sequence[Seq], pad_token_id: int, completion_only: bool = True,
                 width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / loss_mask [B, width or longest].

    loss_mask: the completion tokens, or with completion_only=False every token that has a token
    before it (the first one is never predicted).
    """
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n_p, n = len(s.prompt), len(s)
        ids[i, :n] = torch.tensor(s.prompt + s.completion, dtype=torch.long)
        attn[i, :n] = 1
        loss[i, (n_p if completion_only else 1) : n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_pairs(pairs: Sequence[Pair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* rows padded to one width (one forward runs both); margin [B] if set."""
    width = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    out = {}
    for side in ("chosen", "rejected"):
        rows = collate_rows([getattr(p, side) for p in pairs], pad_token_id, width=width)
        out.update({f"{side}_{k}": v for k, v in rows.items()})
    margins = [p.margin for p in pairs]
    if any(m is not None for m in margins):
        out["margin"] = torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
    return out


def collate_labeled(examples: Sequence[Labeled], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows + desirable [B] bool (+ weight [B] when some example's loss weight is not 1)."""
    out = collate_rows([e.seq for e in examples], pad_token_id)
    out["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    if any(e.weight != 1.0 for e in examples):
        out["weight"] = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return out


def collate(examples: Sequence[Example], pad_token_id: int, completion_only: bool = True):
    first = examples[0]
    if isinstance(first, Pair):
        return collate_pairs(examples, pad_token_id)  # type: ignore[arg-type]
    if isinstance(first, Labeled):
        return collate_labeled(examples, pad_token_id)  # type: ignore[arg-type]
    if isinstance(first, tuple):  # a pack of sequences (see pack)
        return collate_packed(examples, pad_token_id, completion_only)  # type: ignore[arg-type]
    return collate_rows(examples, pad_token_id, completion_only)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Packing (SFT)


def pack(seqs: Sequence[Seq], max_length: int) -> list[tuple[Seq, ...]]:
    """Group sequences into packs of at most max_length tokens: first-fit over decreasing lengths
    (deterministic; ties keep the input order). Every sequence lands in exactly one pack."""
    try:
        packs = first_fit([len(s) for s in seqs], max_length)
    except TooLong as e:
        raise ValueError(f"pack: sequence {e.index} has {e.length} tokens, more than max_length={max_length}") from None
    return [tuple(seqs[i] for i in p) for p in packs]


def collate_packed(packs: Sequence[tuple[Seq, ...]], pad_token_id: int,
                   completion_only: bool = True) -> dict[str, torch.Tensor]:
    """Packed rows: sequences back to back, position_ids restarting at 0 for each, right padding.

    Padding positions keep counting after the last sequence (so they never look like a new one).
    The first token of each sequence is never in the loss (it would be predicted from the previous
    sequence). The learner passes position_ids without an attention mask, so attention stays
    inside each sequence.
    """
    width = max(sum(len(s) for s in p) for p in packs)
    ids = torch.full((len(packs), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(packs), width), dtype=torch.long)
    loss = torch.zeros((len(packs), width), dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    for i, p in enumerate(packs):
        at = 0
        for s in p:
            n_p, n = len(s.prompt), len(s)
            ids[i, at : at + n] = torch.tensor(s.prompt + s.completion, dtype=torch.long)
            loss[i, at + (n_p if completion_only else 1) : at + n] = 1
            pos[i, at : at + n] = torch.arange(n)
            at += n
        attn[i, :at] = 1
        last = int(pos[i, at - 1]) if at else -1
        pos[i, at:] = torch.arange(last + 1, last + 1 + width - at)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "position_ids": pos}


# ---------------------------------------------------------------------------------------------
# The order of training


class Schedule:
    """Which examples form optimizer step k: epoch e = k // steps_per_epoch visits a permutation
    seeded by (seed, e) in batches of batch_size; the last partial batch of an epoch is left out
    (a later epoch's shuffle includes those examples). Random access, so a resume skips nothing."""

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 epochs: int = 1, steps: int | None = None):
        if num_examples < batch_size:
            raise DataError(
                f"offline.batch_size={batch_size} is more than the {num_examples} training examples left "
                "after encoding: lower offline.batch_size (a multiple of learner.num_ranks * "
                "learner.micro_batch_size) or add data"
            )
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_examples // batch_size
        self.total_steps = steps if steps is not None else epochs * self.steps_per_epoch
        self.dropped_per_epoch = num_examples - self.steps_per_epoch * batch_size
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.num_examples))
            if self.shuffle:
                random.Random(f"fleetrl-offline:{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: steps are visited in order
        return self._orders[epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside 0..{self.total_steps - 1}")
        b = step % self.steps_per_epoch
        return self.order(self.epoch_of(step))[b * self.batch_size : (b + 1) * self.batch_size]
