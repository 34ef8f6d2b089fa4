"""GRPO with LoRA through the real services: a DeepSpeed rank training an adapter, a vLLM CPU worker
taking adapter-only syncs (rollout.lora_sync: merged).

One run checks: only the adapter has optimizer state and no reference copy is loaded; the reference
(adapter disabled) keeps the base model's log-probs while the policy moves; each sync sends exactly
the adapter's bytes; after each of two updates vLLM's log-probs match the learner's (the second
version is merged from the base, not onto the first).
"""

import pytest
import ray
import torch

from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.group import LearnerGroup
from fleetrl.online.batch import Sample, pad_samples
from fleetrl.online.weights import WeightSync
from fleetrl.rollout.config import RolloutConfig
from fleetrl.rollout.fleet import RolloutFleet

pytestmark = pytest.mark.e2e


def test_grpo_lora_adapter_sync_matches_the_learner(ray_local, tiny_policy, tmp_path):
    model = str(tiny_policy)
    fleet = RolloutFleet(
        RolloutConfig(num_workers=1, max_model_len=256, enforce_eager=True, cpu_kvcache_space_gb=1,
                      dtype="float32", lora_sync="merged", env_vars={"VLLM_LOGGING_LEVEL": "WARNING"}),
        model, name_prefix="lora/",
    )
    learner = LearnerGroup(LearnerConfig(zero_stage=2, lr=1e-2, micro_batch_size=2, lora={"r": 8, "alpha": 16},
                                         loss={"kl_coef": 0.01}),
                           model, total_steps=2, mini_batch_size=2, name_prefix="lora/")
    try:
        fleet.wait_ready()
        sync = WeightSync(learner, fleet, backend="gloo")
        worker = fleet.book.handle(fleet.book.indices()[0])

        prompt, completion = [5, 17, 42, 99], [7, 7, 7, 120, 3]
        rows = [Sample(0, "", prompt, completion, [0.0] * len(completion), "stop", 0),
                Sample(0, "", prompt, [8, 9], [0.0, 0.0], "stop", 0)]
        batch = pad_samples(rows, pad_id=0)
        p, n = len(prompt), len(completion)
        base_learner = learner.compute_logprobs(batch)[0, p:p + n]
        base_vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        assert torch.allclose(base_vllm, base_learner, atol=1e-3)  # B = 0 at start: adapter model == base

        plan = learner.weight_plan(1)
        mem = learner.memory()[0]
        assert plan.lora_scale == 2.0
        assert plan.num_bytes == mem["trainable_bytes"]  # only the adapter travels
        assert plan.num_bytes < mem["param_bytes"] / 3

        last = base_vllm
        for version in (1, 2):
            batch["old_logprobs"] = learner.compute_logprobs(batch) * batch["loss_mask"]
            batch["ref_logprobs"] = learner.compute_logprobs(batch, "reference")  # as the driver does
            batch["advantages"] = torch.tensor([1.0, -1.0])  # push the first completion up
            learner.train(batch, mini_batch_size=2)
            sync.push(version=version)

            vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
            policy = learner.compute_logprobs(batch)[0, p:p + n]
            reference = learner.compute_logprobs(batch, "reference")[0, p:p + n]
            assert ray.get(worker.get_weight_version.remote()) == version
            assert torch.allclose(reference, base_learner, atol=1e-5)  # adapter off == base model
            assert torch.allclose(vllm, policy, atol=1e-3), (version, vllm, policy)
            assert (vllm - last).abs().max() > 0.01, (version, vllm, last)  # this version did land
            last = vllm

        # Resume restores the adapter and its optimizer: a step after loading equals a step after saving.
        saved = learner.compute_logprobs(batch)[0, p:p + n]
        learner.save_checkpoint(tmp_path / "ckpt", {"step": 2})
        learner.train(batch, mini_batch_size=2)
        after_step = learner.compute_logprobs(batch)[0, p:p + n]
        assert learner.load_checkpoint(tmp_path / "ckpt") == {"step": 2}
        assert torch.allclose(learner.compute_logprobs(batch)[0, p:p + n], saved, atol=1e-6)
        learner.train(batch, mini_batch_size=2)
        assert torch.allclose(learner.compute_logprobs(batch)[0, p:p + n], after_step, atol=1e-5)

        # final_model/ is the adapter (PEFT format); export --merged gives a plain HF model with the same log-probs.
        learner.save_hf(tmp_path / "final_model")
        assert (tmp_path / "final_model" / "adapter_config.json").exists()
        from transformers import AutoModelForCausalLM

        from fleetrl.cli import main

        assert main(["export", str(tmp_path), "--merged", str(tmp_path / "merged")]) == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        ids = batch["input_ids"][:1, :p + n]
        with torch.no_grad():
            logits = merged(input_ids=ids).logits[0, p - 1:p + n - 1]
        exported = torch.log_softmax(logits, -1).gather(-1, ids[0, p:, None]).squeeze(-1)
        assert torch.allclose(exported, after_step, atol=1e-4), (exported, after_step)

        mem = learner.memory()[0]
        # Adam's two moments, over the adapter only (ZeRO may pad its flat partition a little).
        assert 2 * mem["trainable_bytes"] <= mem["optimizer_bytes"] <= 2 * mem["trainable_bytes"] + 4096, mem
    finally:
        fleet.shutdown()
        learner.shutdown()
