"""LoRA: the PEFT wrapping, what gets gradients, the adapter-disabled reference, merge == adapter model,
the adapter-only wire payload, export, and the config errors. Plain torch + transformers + peft."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from fleetrl.core.weight_wire import merge_lora, plan_buckets
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.learner.lora import AdapterDisabled, LoraConfig, adapter_tensors, apply_lora, export_merged, wire_name
from fleetrl.rollout.config import RolloutConfig, vllm_lora_rank
from fleetrl.rollout.weight_receiver import plan_from_plain, plan_to_plain, write_peft_adapter
from fleetrl.rollout.worker import adapter_root, engine_kwargs

IDS = torch.tensor([[5, 17, 42, 99, 7, 7, 120, 3], [8, 9, 10, 11, 12, 13, 14, 15]])


@pytest.fixture(scope="module")
def base(tiny_policy):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()


def _logps(model, ids=IDS):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


SMALL = LoraConfig(r=4, alpha=8.0)


def _trained_adapter(base, cfg=SMALL):
    """A LoRA model whose adapter is not the identity (B is zero at init: give it values)."""
    model = apply_lora(copy.deepcopy(base), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapter_tensors(model).items():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.05)
    return model.eval()


def test_only_adapter_params_get_gradients_and_optimizer_state(base):
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # "all-linear": every projection of every block, never the embedding or the head.
    assert len(trainable) == 2 * 7 * base.config.num_hidden_layers
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    state_params = {id(p) for p in opt.state}
    assert state_params == {id(p) for n, p in model.named_parameters() if n in trainable}


def test_reference_with_adapter_disabled_equals_the_base_model(base):
    model = _trained_adapter(base)
    model.train()  # the reference switches to eval itself and back
    ref = AdapterDisabled(model, model)
    assert torch.allclose(_logps(ref), _logps(base), atol=1e-6)
    assert model.training
    assert (_logps(model.eval()) - _logps(base)).abs().max() > 1e-3  # the adapter does change the model


def test_merge_then_reload_gives_the_adapter_models_logprobs(base):
    model = _trained_adapter(base)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = [(n, p.detach()) for n, p in adapter_tensors(model).items()]
    merged = merge_lora(base_state, adapter, LoraConfig(r=4, alpha=8.0).scale)
    assert len(merged) == 7 * base.config.num_hidden_layers
    fresh = copy.deepcopy(base)
    fresh.load_state_dict({**base_state, **merged})
    assert torch.allclose(_logps(fresh), _logps(model), atol=1e-5)
    # Merging a second version from the same base does not pile the first one up.
    twice = merge_lora(base_state, adapter, 2.0)
    once = merge_lora(base_state, [(n, t * 0) if n.endswith("lora_B.weight") else (n, t) for n, t in adapter], 2.0)
    key = next(iter(twice))
    assert torch.equal(once[key], base_state[key]) and not torch.equal(twice[key], base_state[key])


def test_adapter_only_plan_bytes(base):
    r = 8
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=r, alpha=16))
    tensors = adapter_tensors(model)
    plan = plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in tensors.items()], version=3,
                        bucket_bytes=2**20, lora_scale=2.0)
    c = base.config
    hd = c.hidden_size // c.num_attention_heads
    q, kv, o = (c.hidden_size, c.num_attention_heads * hd), (c.hidden_size, c.num_key_value_heads * hd), \
        (c.num_attention_heads * hd, c.hidden_size)
    mlp_in, mlp_out = (c.hidden_size, c.intermediate_size), (c.intermediate_size, c.hidden_size)
    per_layer = sum(r * (i + o_) for i, o_ in (q, kv, kv, o, mlp_in, mlp_in, mlp_out))
    assert plan.num_bytes == 4 * per_layer * c.num_hidden_layers  # float32 A and B of 7 modules per layer
    full = sum(p.numel() * 4 for p in base.parameters())
    assert plan.num_bytes < full / 3
    # Names are the Hugging Face module names; the scale survives the rpc-safe plain form.
    assert all(s.name.startswith("model.layers.") for b in plan.buckets for s in b.specs)
    back = plan_from_plain(plan_to_plain(plan))
    assert back == plan and back.lora_scale == 2.0


def test_wire_names():
    assert wire_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == \
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert wire_name("base_model.model.model.embed_tokens.weight") is None


def test_merge_errors_name_the_module():
    base = {"m.weight": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="'m' has only \\['lora_A'\\]"):
        merge_lora(base, [("m.lora_A.weight", torch.zeros(1, 2))], 1.0)
    with pytest.raises(KeyError, match="no base weight 'x.weight'"):
        merge_lora(base, [("x.lora_A.weight", torch.zeros(1, 2)), ("x.lora_B.weight", torch.zeros(3, 1))], 1.0)
    with pytest.raises(ValueError, match="neither"):
        merge_lora(base, [("m.weight", torch.zeros(3, 2))], 1.0)


def test_export_merged_writes_a_loadable_model(base, tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained_adapter(base)
    model.save_pretrained(tmp_path / "final_model")
    cfg = json.loads((tmp_path / "final_model" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_policy)
    out = export_merged(tmp_path / "final_model", tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(_logps(loaded), _logps(model), atol=1e-5)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    with pytest.raises(FileNotFoundError, match="is not a LoRA adapter"):
        export_merged(tiny_policy, tmp_path / "x")


def test_config_errors_and_defaults():
    assert LearnerConfig().lora is None
    cfg = LearnerConfig(lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert cfg.lora.scale == 4.0
    with pytest.raises(ValidationError, match="target_modules must be 'all-linear' or a non-empty list"):
        LearnerConfig(lora={"target_modules": []})
    with pytest.raises(ValidationError, match="r\n"):
        LearnerConfig(lora={"r": 0})
    with pytest.raises(ValidationError, match="enable_lora and max_lora_rank follow rollout.lora_sync"):
        RolloutConfig(engine_kwargs={"enable_lora": True})
    assert CriticConfig().learner_config(cfg).lora is None  # the critic keeps full weights


def test_bad_target_modules_name_the_key(base):
    with pytest.raises(ValueError, match="learner.lora.target_modules=\\['nope'\\]"):
        apply_lora(copy.deepcopy(base), LoraConfig(target_modules=["nope"]))
    # An embedding adapter trains, but no sync could carry it: an error, not a fleet on other weights.
    model = apply_lora(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="embed_tokens.lora_embedding_A.* is trained but a weight sync cannot"):
        adapter_tensors(model)


def test_override_turns_lora_on():
    from fleetrl.run.config import load_config

    cfg = load_config("examples/grpo_tiny.yaml", ["learner.lora.r=8"])
    assert cfg.learner.lora == LoraConfig(r=8)


def test_adapter_dir_loads_in_peft_and_passes_vllms_checks(base, tmp_path):
    """rollout.lora_sync: adapter writes what PEFT and vLLM's LoRA loader read, from the wire's tensors."""
    from peft import PeftModel

    model = _trained_adapter(base, LoraConfig(r=8, alpha=16))
    # As the receiver holds them: views of one flat bucket (safetensors refuses shared storage as is).
    tensors = adapter_tensors(model)
    plan = plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in tensors.items()], version=1, lora_scale=2.0)
    from fleetrl.core.weight_wire import pack_bucket, unpack_bucket

    wire = [t for b in plan.buckets for t in unpack_bucket(b, pack_bucket(b, tensors))]
    out = write_peft_adapter(tmp_path / "v1", wire, 2.0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not (tmp_path / "v1.tmp").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert torch.allclose(_logps(loaded), _logps(model), atol=1e-6)

    from vllm.config.lora import LoRAConfig as VllmLoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(out), max_position_embeddings=None)
    helper.validate_legal(VllmLoRAConfig(max_lora_rank=vllm_lora_rank(8)))
    assert helper.vllm_lora_scaling_factor == 2.0
    with pytest.raises(ValueError, match="LoRA rank 8 is greater than max_lora_rank"):
        PEFTHelper.from_local_dir(str(out), None).validate_legal(VllmLoRAConfig(max_lora_rank=1))

    with pytest.raises(ValueError, match="neither <module>.lora_A.weight"):
        write_peft_adapter(tmp_path / "bad", [("model.norm.weight", torch.ones(3))], 2.0)
    with pytest.raises(ValueError, match="several ranks \\[4, 8\\]"):
        write_peft_adapter(tmp_path / "bad", [("a.lora_A.weight", torch.ones(4, 2)),
                                              ("b.lora_A.weight", torch.ones(8, 2))], 1.0)


def test_adapter_mode_engine_arguments():
    cfg = RolloutConfig(lora_sync="adapter")
    assert "enable_lora" not in engine_kwargs(cfg, "m")  # full fine-tuning: a plain engine
    kw = engine_kwargs(cfg, "m", lora_rank=12)
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and kw["max_loras"] == 2
    assert "enable_lora" not in engine_kwargs(RolloutConfig(), "m", lora_rank=8)  # merged: no LoRA in vLLM
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="learner.lora.r=600 is above vLLM's largest LoRA rank"):
        vllm_lora_rank(600)
    from fleetrl.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="learner.lora.r=600 is above"):
        load_config("examples/grpo_tiny.yaml", ["learner.lora.r=600", "rollout.lora_sync=adapter"])


def test_adapter_root_removes_what_dead_workers_left(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"fleetrl-lora-w3-pid{dead.pid}"
    (stale / "v1-1").mkdir(parents=True)
    live = tmp_path / f"fleetrl-lora-w4-pid{os.getppid()}"
    live.mkdir()
    root = adapter_root(0, str(tmp_path))
    assert root == str(tmp_path / f"fleetrl-lora-w0-pid{os.getpid()}") and os.path.isdir(root)
    assert not stale.exists() and live.exists()


class _FakeEngine:
    """Stands in for vLLM's AsyncLLM: records add/remove_lora and which adapter each request used;
    a request holds until its gate opens."""

    errored = False

    def __init__(self):
        self.loaded, self.removed, self.used, self.gates = set(), [], [], {}

    async def add_lora(self, request):
        if "broken" in request.lora_path:
            raise RuntimeError("Loading lora failed: No adapter found")
        self.loaded.add(request.lora_int_id)
        return True

    async def remove_lora(self, lora_id):
        self.loaded.discard(lora_id)
        self.removed.append(lora_id)
        return True

    async def generate(self, prompt, params, request_id, lora_request=None):
        import asyncio
        from types import SimpleNamespace

        self.used.append(None if lora_request is None else lora_request.lora_int_id)
        gate = self.gates.setdefault(request_id, asyncio.Event())
        await gate.wait()
        logprob = SimpleNamespace(logprob=-1.0)
        yield SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[7], logprobs=[{7: logprob}],
                                                       finish_reason="stop")])


def test_adapter_versions_in_flight_and_release(tmp_path):
    """rollout.lora_sync: adapter bookkeeping: a request keeps the adapter (and version) it started
    with, an old adapter goes (engine and disk) when its last request ends, a failed load names the
    worker and version and changes nothing."""
    import asyncio

    from fleetrl.rollout.worker import RolloutWorker, sampling_params

    async def scenario():
        w = object.__new__(RolloutWorker)
        w._init_state(RolloutConfig(lora_sync="adapter"), "m", 5, lora_rank=8)
        assert w.adapter_mode
        w.engine = engine = _FakeEngine()
        w._adapter_root = str(tmp_path)
        params = sampling_params({"max_tokens": 1}, 1)
        dirs = [tmp_path / f"v{v}" for v in (1, 2)]
        for d in [*dirs, tmp_path / "broken"]:
            d.mkdir()
        assert await w.load_adapter(1, str(dirs[0])) == 1
        old = asyncio.ensure_future(w._sample("a", [1, 2], params))
        await asyncio.sleep(0)
        await w.load_adapter(2, str(dirs[1]))  # while "a" runs on version 1
        assert engine.removed == [] and dirs[0].exists()  # still in use
        new = asyncio.ensure_future(w._sample("b", [1, 2], params))
        await asyncio.sleep(0)
        for gate in engine.gates.values():
            gate.set()
        (a,), (b,) = await old, await new
        assert (a.weight_version, a.last_weight_version) == (1, 1)
        assert (b.weight_version, b.last_weight_version) == (2, 2)
        assert engine.used == [1, 2]
        assert engine.removed == [1] and not dirs[0].exists() and dirs[1].exists()  # released after "a" ended
        with pytest.raises(RuntimeError, match="rollout worker 5: vLLM could not load the LoRA adapter of weight "
                                               "version 3 from .*broken.*keeps serving version 2"):
            await w.load_adapter(3, str(tmp_path / "broken"))
        assert not (tmp_path / "broken").exists()  # written for nothing: removed
        assert w.weight_version == 2 and w._lora.lora_int_id == 2 and engine.removed == [1]

    asyncio.run(scenario())
