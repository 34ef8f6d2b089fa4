"""The check after a weight sync (fleetrl.core.weight_check): checksums of the weights as loaded
(fused the way vLLM fuses them) against the learner's, and every injected fault caught."""

import pytest
import torch

from fleetrl.core.weight_check import (
    CHECKSUM_FAULTS,
    FAULTS,
    PROBE_FAULTS,
    apply_fault,
    checksums,
    compare_checksums,
    parse_fault,
    probe_diff,
    probe_tolerance,
    tensor_checksum,
    unfuse_name,
)
from fleetrl.online.weights import probe_token_ids
from fleetrl.rollout.config import RolloutConfig

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def hf_weights(seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj.weight", (4, 4)), ("self_attn.k_proj.weight", (2, 4)),
                            ("self_attn.v_proj.weight", (2, 4)), ("mlp.gate_proj.weight", (6, 4)),
                            ("mlp.up_proj.weight", (6, 4)), ("input_layernorm.weight", (4,))):
            out[p + name] = torch.randn(*shape, generator=g) * 0.02
    out["model.norm.weight"] = 1 + 0.01 * torch.randn(4, generator=g)
    return out


def load_like_vllm(hf: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """vLLM's parameters for these weights: q/k/v and gate/up fused, embedding rows padded with zeros."""
    out = {}
    for name, t in hf.items():
        if ".q_proj." in name:
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                [t, hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]])
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf[name.replace("gate_proj", "up_proj")]])
        elif "embed_tokens" in name:
            out[name] = torch.cat([t, torch.zeros(6, t.shape[1])])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t
    return {n: t.to(dtype) for n, t in out.items()}


def loaded_report(params: dict[str, torch.Tensor]) -> dict:
    return {n: (tensor_checksum(t), str(t.dtype).removeprefix("torch."), unfuse_name(n, PACKED))
            for n, t in params.items()}


def check(sent: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], sent_dtype: str = "float32"):
    return compare_checksums(checksums(sent.items()), {n: sent_dtype for n in sent}, loaded_report(loaded))


def test_a_clean_load_matches_through_fusing_and_padding_and_every_tensor_is_checked():
    new = hf_weights(1)
    bad, unreadable, missing = check(new, load_like_vllm(new))
    assert bad == [] and unreadable == [] and missing == []


def test_a_cast_on_the_way_is_within_the_dtype_tolerance_but_a_training_step_is_not():
    new = hf_weights(1)
    assert check(new, load_like_vllm(new, torch.bfloat16)) == ([], [], [])
    moved = {n: t + 1e-4 * torch.sign(t) for n, t in new.items()}  # one small Adam-like step
    bad, _, _ = check(moved, load_like_vllm(new))
    assert bad


def test_a_parameter_the_engine_cannot_read_back_is_named_not_passed_and_an_unsent_one_is_missing():
    new = hf_weights(1)
    report = loaded_report(load_like_vllm(new))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    report[qkv] = (None, "float32", report[qkv][2])  # packed away (vLLM CPU, oneDNN)
    del report["model.norm.weight"]
    bad, unreadable, missing = compare_checksums(checksums(new.items()), {n: "float32" for n in new}, report)
    assert bad == []
    assert unreadable == [qkv.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    assert missing == ["model.norm.weight"]


def test_unfuse_names_the_hugging_face_tensors_a_fused_parameter_holds():
    assert unfuse_name("model.layers.3.self_attn.qkv_proj.weight", PACKED) == [
        "model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight"]
    assert unfuse_name("model.norm.weight", PACKED) == ["model.norm.weight"]


@pytest.mark.parametrize("fault", CHECKSUM_FAULTS)
def test_every_injected_fault_is_caught_by_the_checksums(fault):
    old, new = hf_weights(0), hf_weights(1)
    held = dict(old)  # the worker's weights before the sync; a reload updates the tensors it gets
    held.update(dict(apply_fault(fault, list(new.items()))))
    bad, _, missing = check(new, load_like_vllm(held))
    assert bad, f"{fault} was not caught"
    assert missing == []
    held_clean = dict(old) | new
    assert check(new, load_like_vllm(held_clean)) == ([], [], [])


def test_a_nan_in_the_loaded_weights_is_a_mismatch():
    new = hf_weights(1)
    loaded = load_like_vllm(new)
    loaded["model.norm.weight"] = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    bad, _, _ = check(new, loaded)
    assert len(bad) == 1 and bad[0].startswith("model.norm.weight")


def test_fault_spec_parses_kinds_and_versions_and_names_the_choices():
    assert parse_fault(None) == [] and parse_fault("") == []
    assert parse_fault("stale_layer") == [("stale_layer", None)]
    assert parse_fault("corrupt_bucket@2,miss_update@3") == [("corrupt_bucket", 2), ("miss_update", 3)]
    with pytest.raises(ValueError, match="FLEETRL_WEIGHT_FAULT='flip'.*corrupt_bucket, skip_tensor"):
        parse_fault("flip")
    with pytest.raises(ValueError, match="@<version>"):
        parse_fault("miss_update@x")


def test_verification_is_on_by_default_with_one_resend():
    cfg = RolloutConfig()
    assert cfg.verify_weights is True and cfg.verify_weights_retries == 1
    with pytest.raises(ValueError, match="verify_weights_retries"):
        RolloutConfig(verify_weights_retries=-1)


def test_an_interrupted_reload_stops_halfway_with_an_error():
    new = list(hf_weights(1).items())
    taken = []
    with pytest.raises(RuntimeError, match="interrupt_reload: the weights stopped arriving halfway"):
        for named in apply_fault("interrupt_reload", new):
            taken.append(named)
    assert 0 < len(taken) < len(new)
    assert "interrupt_reload" in FAULTS


def tiny_lm(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


@torch.no_grad()
def logprobs_of(model, ids: list[int]) -> list[float]:
    """What the probe compares: log p(ids[t] | ids[:t]) for t >= 1."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_permuted_rows_pass_the_checksums_but_not_the_log_prob_probe():
    # A matrix whose rows were moved keeps its checksums: only the probe can see this fault.
    learner = tiny_lm()
    sent = dict(learner.state_dict())
    held = dict(apply_fault("permute_rows", list(sent.items())))
    assert any(not torch.equal(held[n], sent[n]) for n in sent)
    assert check(sent, held) == ([], [], [])

    fleet = tiny_lm(seed=1)
    fleet.load_state_dict(held)
    ids = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]
    want = logprobs_of(learner, ids)
    mean, worst = probe_diff(want, logprobs_of(fleet, ids))
    assert mean > probe_tolerance("float32") and worst >= mean
    fleet.load_state_dict(sent)  # the clean load: the same log-probs
    assert probe_diff(want, logprobs_of(fleet, ids))[0] < 1e-6
    assert "permute_rows" in PROBE_FAULTS and "permute_rows" not in CHECKSUM_FAULTS


def test_probe_tolerance_is_set_by_the_coarser_dtype_and_a_nan_always_fails():
    assert probe_tolerance("float32") == 0.01
    assert probe_tolerance("float32", "bfloat16") == probe_tolerance("bfloat16") == 0.1
    assert probe_tolerance("torch.float16", "float32") == 0.05
    assert probe_tolerance("float8_e4m3fn") == 0.1  # unknown: bf16's
    assert probe_diff([-1.0, -2.0], [-1.5, -2.0]) == (0.25, 0.5)
    assert probe_diff([-1.0, -2.0], [float("nan"), -2.0]) == (float("inf"), float("inf"))
    with pytest.raises(ValueError, match="same non-empty token list"):
        probe_diff([-1.0], [-1.0, -2.0])


def test_the_probe_is_on_by_default_and_takes_the_first_prompts_tokens():
    cfg = RolloutConfig()
    assert cfg.verify_probe_tokens == 32 and cfg.verify_probe_every == 1 and cfg.verify_probe_tolerance is None
    assert cfg.verify_probe_wait is False  # checked at the next sync, off the critical path
    with pytest.raises(ValueError, match="verify_probe_every"):
        RolloutConfig(verify_probe_every=0)
    with pytest.raises(ValueError, match="verify_probe_tolerance"):
        RolloutConfig(verify_probe_tolerance=0)

    class Chars:  # a tokenizer without a chat template: one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    assert probe_token_ids(["abc", "defgh", "ij"], Chars(), 6) == [97, 98, 99, 100, 101, 102]
    assert probe_token_ids(["abc"], Chars(), 6) == [97, 98, 99]  # fewer tokens than asked: all there are
    assert probe_token_ids(["a"], Chars(), 6) == []  # one token has nothing to score
    assert probe_token_ids(["abc"], Chars(), 0) == []
