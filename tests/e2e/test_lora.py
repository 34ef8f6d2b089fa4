"""GRPO with LoRA through the real services: a DeepSpeed rank training an adapter, vLLM CPU workers
taking adapter-only syncs in both modes (rollout.lora_sync: merged, then adapter).

One run checks: only the adapter has optimizer state and no reference copy is loaded; the reference
(adapter disabled) keeps the base model's log-probs while the policy moves; each sync sends exactly
the adapter's bytes; after each of two updates vLLM's log-probs match the learner's (the second
version is merged from the base, not onto the first). Adapter mode (a second engine, started with
the first): a worker that joins late gets the current adapter; after an update its log-probs match
again; requests in flight during a sync keep the version they started on; an adapter vLLM cannot
load fails with the worker and version named, and the worker goes on serving its version.
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


def _rollout(mode: str) -> RolloutConfig:
    return RolloutConfig(num_workers=1, max_model_len=256, enforce_eager=True, cpu_kvcache_space_gb=1,
                         dtype="float32", lora_sync=mode, env_vars={"VLLM_LOGGING_LEVEL": "WARNING"})


def test_grpo_lora_adapter_sync_matches_the_learner(ray_local, tiny_policy, tmp_path):
    model = str(tiny_policy)
    fleet = RolloutFleet(_rollout("merged"), model, name_prefix="lora/", lora_rank=8)
    # Started now (actors start side by side), used once the merged mode's checks are done.
    adapter_fleet = RolloutFleet(_rollout("adapter"), model, name_prefix="lora-adapter/", lora_rank=8)
    learner = LearnerGroup(LearnerConfig(zero_stage=2, lr=1e-2, micro_batch_size=2, lora={"r": 8, "alpha": 16},
                                         loss={"kl_coef": 0.01}),
                           model, total_steps=4, mini_batch_size=2, name_prefix="lora/")
    try:
        fleet.wait_ready()
        sync = WeightSync(learner, fleet, backend="gloo")
        worker = fleet.book.handle(fleet.book.indices()[0])

        prompt, completion = [5, 17, 42, 99], [7, 7, 7, 120, 3]
        # The checksums skip adapter plans (what loads is not what was sent): the log-prob probe,
        # waited for here, is the check of a LoRA sync.
        sync.probe_ids = prompt + completion
        fleet.cfg.verify_probe_wait = adapter_fleet.cfg.verify_probe_wait = True
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
            assert sync.probe_s > 0 and sync.probe_abs_diff < 1e-3 and sync.verify_failed == 0, sync.probe_abs_diff

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
        fleet.shutdown()

        # rollout.lora_sync: adapter. Its worker joins at version 0 (the base model) and gets the current
        # adapter from the next push, as a restarted or added worker does (resize_fleet pushes sync.version).
        adapter_fleet.wait_ready()
        worker = adapter_fleet.book.handle(adapter_fleet.book.indices()[0])
        assert torch.allclose(torch.tensor(ray.get(worker.score.remote(prompt, completion))), base_learner, atol=1e-3)
        sync = WeightSync(learner, adapter_fleet, backend="gloo")
        sync.probe_ids = prompt + completion
        sync.push(version=2)
        assert sync.probe_s > 0 and sync.probe_abs_diff < 1e-3 and sync.verify_failed == 0, sync.probe_abs_diff
        policy = learner.compute_logprobs(batch)[0, p:p + n]
        vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        assert torch.allclose(vllm, policy, atol=1e-3), (vllm, policy)
        before = vllm

        # An update, synced while a request is in flight: only the adapter's bytes arrive; the request
        # finishes on the version it started with, new ones get the new adapter.
        learner.train(batch, mini_batch_size=2)
        policy = learner.compute_logprobs(batch)[0, p:p + n]
        long = worker.generate.remote([prompt], 4, {"max_tokens": 200, "ignore_eos": True}, ["long"])
        plan = learner.weight_plan(3)
        stats = ray.get(learner.send_weights(plan) + adapter_fleet.receive_weights(plan), timeout=120)[-1]
        assert stats["weight_version"] == 3 and stats["ranks"][0]["bytes"] == mem["trainable_bytes"], stats
        assert {(c.weight_version, c.last_weight_version) for c in ray.get(long)} == {(2, 2)}
        vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        assert torch.allclose(vllm, policy, atol=1e-3), (vllm, policy)
        assert (vllm - before).abs().max() > 0.01  # the update landed
        fresh = ray.get(worker.generate.remote([prompt], 2, {"max_tokens": 4}, ["new"]))
        assert {(c.weight_version, c.last_weight_version) for c in fresh} == {(3, 3)}

        # An adapter vLLM cannot load: the error names the worker and the version; version 3 stays served.
        with pytest.raises(RuntimeError, match="(?s)rollout worker 0: vLLM could not load the LoRA adapter of "
                                               "weight version 4 from .*missing.*keeps serving version 3"):
            ray.get(worker.load_adapter.remote(4, str(tmp_path / "missing")))
        assert ray.get(worker.get_weight_version.remote()) == 3
        assert torch.allclose(torch.tensor(ray.get(worker.score.remote(prompt, completion))), vllm, atol=1e-6)
    finally:
        fleet.shutdown()
        adapter_fleet.shutdown()
        learner.shutdown()
