"""LearnerConfig validation, DeepSpeed config generation, LR schedule, rank env (no DeepSpeed import)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from fleetrl.learner.config import (
    LearnerConfig,
    PolicyLossConfig,
    micro_steps_per_mini_batch,
    resolve_backend,
    resolve_dtype,
)
from fleetrl.learner.deepspeed_utils import deep_merge, lr_lambda, reference_ds_config, train_ds_config
from fleetrl.learner.group import _split_rows, learner_env


def test_defaults_are_valid_and_cluster_oriented():
    cfg = LearnerConfig()
    assert cfg.zero_stage == 2 and cfg.reference and cfg.loss.kl_in == "loss"
    assert cfg.loss == PolicyLossConfig()


@pytest.mark.parametrize("stage", [-1, 4])
def test_zero_stage_out_of_range(stage):
    with pytest.raises(ValidationError, match="zero_stage"):
        LearnerConfig(zero_stage=stage)


@pytest.mark.parametrize("value", [0.5, 1.0])
def test_dual_clip_must_exceed_one(value):
    with pytest.raises(ValidationError, match=r"dual_clip must be > 1"):
        LearnerConfig(loss={"dual_clip": value})
    assert LearnerConfig(loss={"dual_clip": 3.0}).loss.dual_clip == 3.0


def test_unknown_keys_are_errors():
    with pytest.raises(ValidationError, match="zero_stag"):
        LearnerConfig.model_validate({"zero_stag": 3})
    with pytest.raises(ValidationError, match="clip"):
        LearnerConfig.model_validate({"loss": {"clip": 0.2}})


def test_kl_without_reference_is_refused():
    with pytest.raises(ValidationError, match=r"kl_coef: 0 or learner.reference: true"):
        LearnerConfig(reference=False)
    assert LearnerConfig(reference=False, loss={"kl_coef": 0}).reference is False


def test_offload_needs_zero():
    with pytest.raises(ValidationError, match="zero_stage to 1, 2 or 3"):
        LearnerConfig(zero_stage=0, offload_optimizer=True)


def test_bad_enums_and_betas():
    with pytest.raises(ValidationError):
        LearnerConfig(dtype="fp8")
    with pytest.raises(ValidationError):
        LearnerConfig(loss={"agg": "sum"})
    with pytest.raises(ValidationError, match=r"adam_betas\[1\]"):
        LearnerConfig(adam_betas=(0.9, 1.0))


def test_micro_steps_per_mini_batch():
    assert micro_steps_per_mini_batch(16, 2, 4) == 2
    assert micro_steps_per_mini_batch(8, 2, 4) == 1
    with pytest.raises(ValueError, match=r"multiple of 2"):
        micro_steps_per_mini_batch(7, 2, 1)
    # The message shows the arithmetic and the field to change.
    with pytest.raises(ValueError,
                       match=r"12 / 2 = 6 sequences is not a multiple of learner.micro_batch_size=4"):
        micro_steps_per_mini_batch(12, 2, 4)
    with pytest.raises(ValueError, match="divisor of 6"):
        micro_steps_per_mini_batch(12, 2, 4)
    with pytest.raises(ValueError):
        micro_steps_per_mini_batch(0, 1, 1)


def test_resolve_auto_values():
    cfg = LearnerConfig()
    assert resolve_backend(cfg, cuda=True) == "nccl" and resolve_backend(cfg, cuda=False) == "gloo"
    assert resolve_dtype(cfg, cuda=True) == "bfloat16" and resolve_dtype(cfg, cuda=False) == "float32"
    assert resolve_dtype(LearnerConfig(dtype="float16"), cuda=False) == "float16"
    with pytest.raises(ValueError, match="sees no CUDA"):
        resolve_backend(LearnerConfig(backend="nccl"), cuda=False)


def test_train_ds_config_cpu_and_gpu():
    cfg = LearnerConfig(zero_stage=3, micro_batch_size=2, max_grad_norm=0.5, lr=3e-6)
    cpu = train_ds_config(cfg, world_size=2, grad_accum_steps=4, dtype="float32", on_gpu=False)
    assert cpu["train_batch_size"] == 2 * 4 * 2
    assert cpu["train_micro_batch_size_per_gpu"] == 2 and cpu["gradient_accumulation_steps"] == 4
    assert cpu["zero_optimization"] == {"stage": 3} and cpu["gradient_clipping"] == 0.5
    assert "optimizer" not in cpu and "bf16" not in cpu  # CPU: torch AdamW client optimizer, fp32
    gpu = train_ds_config(cfg, world_size=2, grad_accum_steps=4, dtype="bfloat16", on_gpu=True)
    assert gpu["bf16"] == {"enabled": True}
    assert gpu["optimizer"]["type"] == "AdamW" and gpu["optimizer"]["params"]["lr"] == 3e-6
    off = train_ds_config(LearnerConfig(offload_optimizer=True), 1, 1, "float32", on_gpu=False)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "optimizer" in off


def test_user_deepspeed_config_is_merged_last():
    cfg = LearnerConfig(deepspeed_config={"zero_optimization": {"reduce_bucket_size": 1000,
                                                                "offload_param": {"device": "cpu"}},
                                          "gradient_clipping": 2.0})
    ds = train_ds_config(cfg, 1, 1, "float32", on_gpu=False)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000,
                                       "offload_param": {"device": "cpu"}}
    assert ds["gradient_clipping"] == 2.0
    ref = reference_ds_config(cfg.model_copy(update={"zero_stage": 3}), 2, "float32")
    assert ref["zero_optimization"]["stage"] == 3 and "optimizer" not in ref
    assert ref["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert deep_merge({"a": {"b": 1}}, {"a": {"c": 2}, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}


def test_lr_schedule():
    warm = lr_lambda(LearnerConfig(lr_warmup_steps=4), total_steps=None)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_lambda(LearnerConfig(lr_schedule="cosine", lr_warmup_steps=2, min_lr_ratio=0.1), total_steps=12)
    assert cos(0) == 0.5 and cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda(LearnerConfig(lr_schedule="cosine"), total_steps=None)


def test_rank_env():
    cpu = learner_env(LearnerConfig(num_cpus_per_rank=3), num_gpus=0)
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["OMP_NUM_THREADS"] == "3"
    gpu = learner_env(LearnerConfig(num_cpus_per_rank=0.5), num_gpus=1)
    assert "DS_ACCELERATOR" not in gpu and gpu["OMP_NUM_THREADS"] == "1"


def test_split_rows_contiguous():
    import torch

    batch = {"input_ids": torch.arange(12).view(6, 2), "advantages": torch.arange(6.0)}
    shards = _split_rows(batch, 3)
    assert [s["advantages"].tolist() for s in shards] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
