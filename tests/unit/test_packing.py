"""Packed online batches (learner/packing.py): the plan, the index maps, and a policy objective whose
loss and gradients on packed rows equal the padded path's (tiny model, in process, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch

from fleetrl.learner.packing import pack_plan, pack_rows, padding_share


def _batch(lengths, firsts=None, T=None, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    firsts = firsts or [0] * len(lengths)
    T = T or max(f + n for f, n in zip(firsts, lengths))
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (f, n) in enumerate(zip(firsts, lengths)):
        ids[i, f : f + n] = torch.randint(3, vocab, (n,), generator=g)
        attn[i, f : f + n] = 1
    return ids, attn


def test_pack_plan_first_fit_decreasing():
    assert pack_plan([5, 3, 2, 4, 1], 6) == [[0, 4], [2, 3], [1]]
    assert sorted(i for row in pack_plan([7, 1, 1, 6, 2, 3], 8) for i in row) == list(range(6))
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than the row capacity 8"):
        pack_plan([2, 9], 8)


def test_pack_rows_roundtrip_and_positions():
    ids, attn = _batch([6, 2, 3, 1], firsts=[0, 4, 1, 0], T=6)  # mixed left and right padding
    p = pack_rows(ids, attn)
    assert p is not None and p.input_ids.shape[0] == 2  # 6 | 3+2+1
    assert torch.equal(p.unpack(p.input_ids), ids * attn)
    assert int(p.attention_mask.sum()) == int(attn.sum())
    # positions restart per sample, padding keeps counting
    row = p.position_ids[1].tolist()
    assert row[:6] == [0, 1, 0, 1, 2, 0]  # samples 1, 2, 3 in index order
    # nothing to gain: equal lengths that cannot share a row
    assert pack_rows(*_batch([4, 4, 4])) is None


def test_pack_rows_rejects_holes():
    ids, attn = _batch([4, 2])
    attn[0, 1] = 0
    with pytest.raises(ValueError, match="row 0 of attention_mask has a hole.*pack_samples: false"):
        pack_rows(ids, attn)


def test_padding_share():
    _, attn = _batch([8, 2, 3, 3])  # 16 real tokens in 4 x 8
    assert padding_share(attn, pack=False) == pytest.approx(0.5)
    assert padding_share(attn, pack=True) == pytest.approx(0.0)  # 8 | 3+3+2


def test_packed_loss_and_gradients_equal_padded(tiny_policy):
    from transformers import AutoModelForCausalLM

    from fleetrl.learner.accumulate import Stats
    from fleetrl.learner.objective import LocalModels
    from fleetrl.learner.policy import PolicyObjective

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy), dtype=torch.float32)
    model.train()
    prompt = [5, 9, 7, 5, 12, 3, 8, 6]
    completion = [20, 3, 11, 1, 30, 7, 2, 15]
    ids, attn = _batch([p + c for p, c in zip(prompt, completion)], seed=3)
    loss_mask = torch.zeros_like(attn)
    for i, (p, c) in enumerate(zip(prompt, completion)):
        loss_mask[i, p : p + c] = 1
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
             "old_logprobs": (-torch.rand(ids.shape, generator=g) * 4) * attn,
             "advantages": torch.randn(len(prompt), generator=g),
             "ref_logprobs": (-torch.rand(ids.shape, generator=g) * 4) * attn}
    assert pack_rows(ids, attn) is not None

    results = {}
    for pack in (False, True):
        cfg = {"pack_samples": pack, "loss": {"kl_coef": 0.1, "entropy_coef": 0.01, "agg": "seq-mean-token-mean"}}
        obj = PolicyObjective(LocalModels(model), cfg)
        model.zero_grad(set_to_none=True)
        stats = Stats()
        loss = obj.loss(batch, stats, temperature=0.9)
        loss.backward()
        results[pack] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                         stats.reduce(lambda t, op="sum": t))
    (l0, g0, s0), (l1, g1, s1) = results[False], results[True]
    assert torch.allclose(l0, l1, atol=1e-6, rtol=1e-5), (l0, l1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name
    for key in ("entropy", "kl", "ratio_mean", "num_tokens"):
        assert s0[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
