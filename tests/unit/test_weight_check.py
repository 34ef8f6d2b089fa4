"""The check after a weight sync (fleetrl.core.weight_check): checksums of the weights as loaded
(fused the way vLLM fuses them) against the learner's, and every injected fault caught."""

import pytest
import torch

from fleetrl.core.weight_check import (
    CHECKSUM_FAULTS,
    FAULTS,
    apply_fault,
    checksums,
    compare_checksums,
    parse_fault,
    tensor_checksum,
    unfuse_name,
)
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
