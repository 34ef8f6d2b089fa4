"""The DeepSpeed learner on CPU with a tiny Qwen2: log-probs, updates, saving, weight sync.

Single-rank tests build a policy `Learner` in this process (world_size 1, gloo); one test runs a
2-rank ZeRO-3 `LearnerGroup` on a real local Ray and receives its weights over a side group.
Reference values come from plain transformers on the same checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fleetrl.algos.logprobs import token_logprobs
from fleetrl.algos.ppo import ppo_policy_loss as policy_loss
from fleetrl.core.weight_wire import broadcast, init_side_group, unpack_bucket
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.deepspeed_utils import free_port
from fleetrl.learner.rank import Learner

pytestmark = pytest.mark.e2e

PROMPT_LEN = 6
SEQ_LEN = 14


@pytest.fixture(scope="module")
def model_path(tiny_policy):
    return str(tiny_policy)


def make_learner(model_path, mini_batch_size=4, **cfg) -> Learner:
    t0 = time.perf_counter()
    cfg = {"micro_batch_size": 2, "lr": 1e-3, **cfg}
    learner = Learner(LearnerConfig(**cfg), model_path, master_port=free_port(),
                      mini_batch_size=mini_batch_size, objective="policy")
    print(f"learner zero={learner.cfg.zero_stage} built in {time.perf_counter() - t0:.1f}s")
    return learner


def make_batch(n=4, seed=0, completion_lens=(8, 5, 3, 8)) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows with completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 400, (n, SEQ_LEN), generator=g)
    attn = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    loss_mask = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    for i in range(n):
        end = PROMPT_LEN + completion_lens[i % len(completion_lens)]
        attn[i, :end] = 1
        loss_mask[i, PROMPT_LEN:end] = 1
        ids[i, end:] = 0  # pad id
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def plain_model(path):
    """The model as plain transformers loads it. A ZeRO-3 learner built earlier in this process registered
    its DeepSpeed config with transformers (process-global, so that the learner's own models load
    partitioned); a plain load here must not be partitioned."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def hf_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) from transformers' logits, unpadded rows; column 0 is 0."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


def hand_grad_norm(model_path, batch, agg) -> float:
    """Norm of the gradient of the whole mini-batch's policy loss, in plain torch (ratio = 1)."""
    model = plain_model(model_path)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = token_logprobs(logits, batch["input_ids"])
    loss, _ = policy_loss(logp, logp.detach(), batch["advantages"], batch["loss_mask"], agg=agg)
    loss.backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def completion_logprob(learner_or_group, batch) -> torch.Tensor:
    lp = learner_or_group.compute_logprobs(batch)
    return (lp * batch["loss_mask"]).sum(-1)


def train_batch(learner_or_group, batch, advantages, with_ref=True) -> dict:
    full = dict(batch)
    full["old_logprobs"] = learner_or_group.compute_logprobs(batch)
    full["advantages"] = advantages
    if with_ref:
        full["ref_logprobs"] = learner_or_group.compute_logprobs(batch, which="reference")
    return full


# ---------------------------------------------------------------------------------------------


def test_logprobs_match_transformers(model_path):
    learner = make_learner(model_path, zero_stage=2)
    hf = plain_model(model_path)
    ids = torch.randint(4, 400, (3, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    lp = learner.compute_logprobs(full)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, hf_logprobs(hf, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(learner.compute_logprobs(full, temperature=0.7), hf_logprobs(hf, ids, 0.7),
                               atol=1e-5, rtol=1e-5)
    # Before any step the frozen reference is the policy.
    torch.testing.assert_close(learner.compute_logprobs(full, which="reference"), lp, atol=0, rtol=0)

    # Padding on either side does not change a row's log-probs (positions count real tokens).
    left = torch.zeros(1, SEQ_LEN + 3, dtype=torch.long)
    left[0, 3:] = ids[0]
    left_mask = (torch.arange(SEQ_LEN + 3) >= 3).long()[None]
    right = torch.zeros(1, SEQ_LEN + 3, dtype=torch.long)
    right[0, :SEQ_LEN] = ids[0]
    right_mask = (torch.arange(SEQ_LEN + 3) < SEQ_LEN).long()[None]
    padded = {"input_ids": torch.cat([left, right]), "attention_mask": torch.cat([left_mask, right_mask])}
    lp_pad = learner.compute_logprobs(padded)
    torch.testing.assert_close(lp_pad[0, 3:], lp[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_pad[1, :SEQ_LEN], lp[0], atol=1e-5, rtol=1e-5)
    assert torch.all(lp_pad[0, :4] == 0) and torch.all(lp_pad[1, SEQ_LEN:] == 0)

    with pytest.raises(ValueError, match="which must be"):
        learner.compute_logprobs(full, which="critic")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_advantage_sign_moves_completion_logprob(model_path, stage):
    learner = make_learner(model_path, zero_stage=stage, lr=1e-3)
    batch = make_batch()
    before = completion_logprob(learner, batch)

    stats = learner.train(train_batch(learner, batch, torch.ones(4)), mini_batch_size=4)
    after_up = completion_logprob(learner, batch)
    assert torch.all(after_up > before), (before, after_up)
    assert len(stats) == 1 and learner.global_step == 1
    s = stats[0]
    assert set(s) >= {"policy_loss", "kl", "entropy", "clip_frac", "approx_kl", "grad_norm", "lr",
                      "ratio_mean", "ratio_max"}
    assert s["policy_loss"] == pytest.approx(-1.0, abs=1e-5)  # ratio 1, advantage 1 on every token
    assert s["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and s["clip_frac"] == 0.0
    assert s["lr"] == pytest.approx(1e-3) and s["grad_norm"] > 0 and s["entropy"] > 0
    assert s["num_tokens"] == float(batch["loss_mask"].sum())

    # Now the policy differs from the reference: the KL stat sees it.
    stats = learner.train(train_batch(learner, batch, -torch.ones(4)), mini_batch_size=4)
    after_down = completion_logprob(learner, batch)
    assert torch.all(after_down < after_up), (after_up, after_down)
    assert stats[0]["kl"] > 0


@pytest.mark.parametrize(
    "stage,agg",
    [(2, "token-mean"), (0, "seq-mean-token-mean"), (3, "seq-mean-token-sum-norm")],
)
def test_micro_batches_accumulate_to_the_mini_batch_gradient(model_path, stage, agg):
    # 4 micro-batches of 1 row with different completion lengths (one empty): the accumulated
    # gradient must be that of the loss aggregated over the whole mini-batch, not a mean of
    # per-micro-batch means.
    learner = make_learner(model_path, zero_stage=stage, micro_batch_size=1, loss={"agg": agg})
    batch = make_batch(completion_lens=(8, 0, 5, 1))
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    stats = learner.train(train_batch(learner, batch, advantages), mini_batch_size=4)
    expected = hand_grad_norm(model_path, {**batch, "advantages": advantages}, agg)
    assert stats[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)


def test_train_input_errors(model_path):
    learner = make_learner(model_path, zero_stage=2)
    batch = train_batch(learner, make_batch(), torch.ones(4))
    with pytest.raises(ValueError, match="built for mini_batch_size=4"):
        learner.train(batch, mini_batch_size=2)
    with pytest.raises(ValueError, match="not a positive multiple of the per-rank mini-batch 4"):
        learner.train({k: v[:3] for k, v in batch.items()}, mini_batch_size=4)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    with pytest.raises(KeyError, match="ref_logprobs"):
        learner.train(no_ref, mini_batch_size=4)
    with pytest.raises(KeyError, match="old_logprobs"):
        learner.train({k: v for k, v in batch.items() if k != "old_logprobs"}, mini_batch_size=4)
    assert learner.global_step == 0


def test_save_hf_and_checkpoint_round_trip(model_path, tmp_path):
    learner = make_learner(model_path, zero_stage=3, lr=1e-3, lr_warmup_steps=4, reference=False,
                           loss={"kl_coef": 0.0})
    batch = make_batch()
    step_a = train_batch(learner, batch, torch.ones(4), with_ref=False)
    learner.train(step_a, mini_batch_size=4)

    # Hugging Face export (gathered from ZeRO-3 partitions) loads in transformers with equal outputs.
    learner.save_hf(tmp_path / "hf")
    exported = plain_model(tmp_path / "hf")
    full = {"input_ids": batch["input_ids"][:, :PROMPT_LEN + 3],
            "attention_mask": torch.ones(4, PROMPT_LEN + 3, dtype=torch.long)}
    torch.testing.assert_close(hf_logprobs(exported, full["input_ids"]), learner.compute_logprobs(full),
                               atol=1e-5, rtol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    original = plain_model(model_path)
    assert not torch.allclose(hf_logprobs(original, full["input_ids"]), learner.compute_logprobs(full))

    # Checkpoint after step 1; step 2 from there is reproduced exactly after a reload, which needs
    # the weights, the Adam moments and the LR schedule position all restored.
    learner.save_checkpoint(tmp_path / "ckpt", {"step": 1, "note": "x"})
    saved = learner.gathered_state_dict()
    step_b = train_batch(learner, batch, -torch.ones(4), with_ref=False)
    first = learner.train(step_b, mini_batch_size=4)[0]
    continued = learner.gathered_state_dict()
    assert learner.global_step == 2

    assert learner.load_checkpoint(tmp_path / "ckpt") == {"step": 1, "note": "x"}
    assert learner.global_step == 1
    for name, value in learner.gathered_state_dict().items():
        torch.testing.assert_close(value, saved[name], atol=0, rtol=0)
    again = learner.train(step_b, mini_batch_size=4)[0]
    assert again["lr"] == first["lr"] == pytest.approx(1e-3 * 2 / 4)  # warm-up step index 1
    for name, value in learner.gathered_state_dict().items():
        torch.testing.assert_close(value, continued[name], atol=1e-7, rtol=1e-6)

    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        learner.load_checkpoint(tmp_path / "nothing-here")


def test_ray_group_zero3_two_ranks(ray_local, model_path, tmp_path):
    from fleetrl.learner.group import LearnerGroup

    ray = ray_local
    t0 = time.perf_counter()
    group = LearnerGroup({"num_ranks": 2, "zero_stage": 3, "micro_batch_size": 1, "lr": 1e-3},
                         model_path, mini_batch_size=4, name_prefix="test-learner-")
    print(f"2-rank group ready in {time.perf_counter() - t0:.1f}s")
    try:
        assert [info["rank"] for info in group.rank_info] == [0, 1]
        assert ray.get_actor("test-learner-learner-rank-1") is not None
        assert len({info["pid"] for info in group.rank_info}) == 2

        # Log-probs split over ranks (5 rows: padded to 6, trimmed back) match transformers.
        hf = plain_model(model_path)
        ids = torch.randint(4, 400, (5, SEQ_LEN), generator=torch.Generator().manual_seed(3))
        full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        torch.testing.assert_close(group.compute_logprobs(full), hf_logprobs(hf, ids), atol=1e-5, rtol=1e-5)

        # One optimizer step over both ranks (2 micro-batches each, unequal token counts per rank):
        # its gradient is the whole mini-batch's, and the advantage sign moves the log-probs.
        batch = make_batch(completion_lens=(8, 1, 2, 8))
        advantages = torch.tensor([1.0, 1.0, 0.5, 2.0])
        before = completion_logprob(group, batch)
        t = time.perf_counter()
        stats = group.train(train_batch(group, batch, advantages), mini_batch_size=4)
        print(f"2-rank train step {time.perf_counter() - t:.2f}s")
        assert stats[0]["grad_norm"] == pytest.approx(
            hand_grad_norm(model_path, {**batch, "advantages": advantages}, "token-mean"), rel=1e-4)
        assert torch.all(completion_logprob(group, batch) > before)

        # Weight sync: this process is rank 1 of the side group and receives every bucket.
        host, port = group.side_group_address()
        refs = group.init_weight_sync(host, port, 2, "gloo")
        side = init_side_group(host, port, 1, 2, "gloo")
        ray.get(refs)
        plan = group.weight_plan(version=1)
        t = time.perf_counter()
        send_refs = group.send_weights(plan)
        received = {}
        for bucket in plan.buckets:
            flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype)
            broadcast(side, flat)
            received.update({name: t.clone() for name, t in unpack_bucket(bucket, flat)})
        ray.get(send_refs)
        print(f"weight sync of {plan.num_bytes / 1e6:.2f} MB in {time.perf_counter() - t:.3f}s")

        # What arrived is the trained model: equal to the gathered ZeRO-3 export.
        group.save_hf(tmp_path / "hf")
        exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
        assert set(received) == {n for n in exported if n != "lm_head.weight"}  # lm_head is tied
        for name, value in received.items():
            torch.testing.assert_close(value, exported[name], atol=0, rtol=0)
        initial = load_file(str(Path(model_path) / "model.safetensors"))
        assert not torch.equal(received["model.layers.0.mlp.up_proj.weight"],
                               initial["model.layers.0.mlp.up_proj.weight"])

        with pytest.raises(ValueError, match="not a positive multiple of 4"):
            group.train({k: v[:3] for k, v in train_batch(group, batch, advantages).items()})
    finally:
        group.shutdown()
