"""Offline trainers' data path: encoding rows, completion-only masks, pairs, packing, the schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fleetrl.data.offline import (
    Encoder,
    Labeled,
    Pair,
    Schedule,
    Seq,
    collate,
    collate_packed,
    collate_pairs,
    collate_rows,
    kto_counts,
    pack,
)
from fleetrl.data.rows import DataError, PreferenceRow, PromptRow, SFTRow, UnpairedRow

ROOT = Path(__file__).resolve().parents[2]


class CharTokenizer:
    """One token per character (id = code point), no chat template, '#' as end of sequence."""

    eos_token = "#"
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def ids(text: str) -> tuple[int, ...]:
    return tuple(ord(c) for c in text)


def sft(p, c, i=1):
    return SFTRow(prompt=p, completion=c, extra={}, source=f"f.jsonl:{i}")


def pref(p, c, r, i=1, **extra):
    return PreferenceRow(prompt=p, chosen=c, rejected=r, extra=extra, source=f"f.jsonl:{i}")


def test_sft_sequence_is_prompt_then_completion_with_eos():
    examples, stats = Encoder("sft", CharTokenizer(), max_length=64).encode([sft("ab:", " xyz")])
    assert examples == [Seq(ids("ab:"), ids(" xyz#"))]
    assert stats.rows == stats.examples == 1 and stats.truncated == 0


def test_completion_only_mask_covers_exactly_the_completion_tokens():
    seqs = [Seq(ids("abc"), ids("de")), Seq(ids("a"), ids("bcdef"))]
    b = collate_rows(seqs, pad_token_id=0)
    assert b["input_ids"].shape == (2, 6)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert b["input_ids"][0, 5] == 0  # right padding with the pad id
    # Without completion-only loss every token with a predecessor counts (never the first one).
    full = collate_rows(seqs, pad_token_id=0, completion_only=False)
    assert full["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]


def test_long_completions_are_cut_and_long_prompts_skipped_and_counted():
    enc = Encoder("sft", CharTokenizer(), max_length=6)
    examples, stats = enc.encode([sft("abcd", "efgh", 1), sft("abcdef", "g", 2), sft("ab", "c", 3)])
    assert examples == [Seq(ids("abcd"), ids("ef")), Seq(ids("ab"), ids("c#"))]
    assert (stats.truncated, stats.skipped_too_long, stats.examples) == (1, 1, 2)
    assert stats.as_metrics("data/train")["data/train/skipped_too_long"] == 1


def test_pairs_share_the_prompt_tokens_and_pad_to_one_width():
    enc = Encoder("dpo", CharTokenizer(), max_length=64)
    (pair,), _ = enc.encode([pref("say a:", " aaaa", " no")])
    assert pair.chosen.prompt == pair.rejected.prompt == ids("say a:")
    assert pair.chosen.completion == ids(" aaaa#") and pair.rejected.completion == ids(" no#")
    b = collate_pairs([pair, Pair(Seq(ids("q"), ids("x")), Seq(ids("q"), ids("yy")))], pad_token_id=0)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 12)
    assert b["chosen_loss_mask"][0].sum() == 6 and b["rejected_loss_mask"][0].sum() == 4
    assert b["rejected_loss_mask"][1].tolist()[:3] == [0, 1, 1]
    assert "margin" not in b


def test_reward_model_rows_are_the_scored_text_and_margins_come_from_a_column():
    enc = Encoder("rm", CharTokenizer(), max_length=8, margin_key="strength")
    (pair,), _ = enc.encode([pref("q:", " aaa", " b", strength=2)])
    # The reward service scores prompt + completion text (no end-of-sequence token added).
    assert pair.chosen == Seq((), ids("q: aaa")) and pair.rejected == Seq((), ids("q: b"))
    assert pair.margin == 2.0
    assert collate([pair], 0)["margin"].tolist() == [2.0]
    # Too long: cut on the left, where a reward model's head does not read.
    (cut,), stats = enc.encode([pref("question:", " aaa", " b", strength=1)])
    assert cut.chosen.completion == ids("ion: aaa") and stats.truncated == 2  # both answers
    with pytest.raises(DataError, match=r"f.jsonl:1: rm.margin_key is 'strength'.*'x'"):
        enc.encode([pref("q:", " a", " b", strength="x")])


def test_kto_reads_unpaired_rows_and_splits_pairs_into_desirable_and_undesirable():
    enc = Encoder("kto", CharTokenizer(), max_length=64)
    rows = [UnpairedRow(prompt="p", completion="c", label=False, extra={}, source="f:1"), pref("q", "g", "b")]
    examples, stats = enc.encode(rows)
    assert [e.desirable for e in examples] == [False, True, False]
    assert examples[1].seq.completion == ids("g#") and examples[2].seq.completion == ids("b#")
    assert kto_counts(examples) == (1, 2) and stats.examples == 3
    b = collate(examples, 0)
    assert b["desirable"].tolist() == [False, True, False] and b["input_ids"].shape[0] == 3


@pytest.mark.parametrize("algorithm,row,needs", [
    ("dpo", sft("p", "c", 7), "preference rows"),
    ("sft", pref("p", "c", "r", 7), "sft rows"),
    ("kto", PromptRow(prompt="p", extra={}, source="f.jsonl:7"), "unpaired rows"),
])
def test_rows_of_the_wrong_kind_name_the_row_and_what_is_needed(algorithm, row, needs):
    with pytest.raises(DataError, match=rf"f.jsonl:7: {algorithm} trains on {needs}"):
        Encoder(algorithm, CharTokenizer(), 64).encode([row])


def test_packing_keeps_every_sequence_once_within_max_length():
    seqs = [Seq(ids("p" * n), ids("c")) for n in (5, 1, 3, 2, 7, 4)]
    packs = pack(seqs, max_length=9)
    flat = [s for p in packs for s in p]
    assert sorted(flat, key=len) == sorted(seqs, key=len)
    assert all(sum(len(s) for s in p) <= 9 for p in packs)
    assert len(packs) == 4  # first-fit decreasing: 8 | 6+3 | 5+4 | 2
    assert pack(seqs, 9) == packs  # deterministic
    with pytest.raises(ValueError, match="more than max_length"):
        pack(seqs, max_length=5)


def test_packed_rows_restart_positions_and_never_train_across_sequences():
    a, b = Seq(ids("ab"), ids("cd")), Seq(ids("e"), ids("fg"))
    out = collate_packed([(a, b), (b,)], pad_token_id=0)
    assert out["input_ids"][0].tolist() == list(ids("abcdefg"))
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert out["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 1, 1]
    # Padding keeps counting positions (it never looks like the start of another sequence).
    assert out["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    full = collate_packed([(a, b)], 0, completion_only=False)
    assert full["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 1, 1]  # each sequence's first token is out
    assert collate([(a, b)], 0)["position_ids"].shape == (1, 7)


def test_schedule_covers_each_epoch_once_reshuffles_and_is_random_access():
    s = Schedule(num_examples=10, batch_size=3, seed=1, epochs=2)
    assert (s.steps_per_epoch, s.total_steps, s.dropped_per_epoch) == (3, 6, 1)
    epoch0 = [i for k in range(3) for i in s.batch(k)]
    epoch1 = [i for k in range(3, 6) for i in s.batch(k)]
    assert len(set(epoch0)) == len(set(epoch1)) == 9
    assert epoch0 != epoch1
    again = Schedule(10, 3, seed=1, epochs=2)
    assert again.batch(4) == s.batch(4) and again.epoch_of(4) == 1
    assert Schedule(10, 3, seed=2).batch(0) != s.batch(0)
    assert Schedule(10, 3, shuffle=False).batch(1) == [3, 4, 5]
    assert Schedule(10, 3, steps=7).total_steps == 7  # run.steps overrides epochs, cycling the data
    with pytest.raises(IndexError):
        s.batch(6)
    with pytest.raises(DataError, match="offline.batch_size=16 is more than the 10 training examples"):
        Schedule(10, 16)


def test_labeled_collate_shapes():
    ex = [Labeled(Seq(ids("ab"), ids("c")), True), Labeled(Seq(ids("a"), ids("bcd")), False)]
    b = collate(ex, pad_token_id=0)
    assert b["input_ids"].shape == (2, 4) and b["desirable"].dtype == torch.bool


def test_example_data_files_are_what_the_generator_writes(tmp_path):
    from examples.make_offline_data import FILES, main

    main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / "data" / name).read_bytes(), name
