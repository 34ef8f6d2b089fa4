"""Config of the critic (`CriticConfig`): PPO's value model, trained by its own DeepSpeed ranks.

Engine settings left unset (None) are the policy learner's (`learner.*`), so a config names only
what differs, usually `lr`. Importing this module does not import torch or DeepSpeed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fleetrl.core.strict import StrictModel
from fleetrl.learner.config import LearnerConfig, PolicyLossConfig

# LearnerConfig fields a critic may set; None = the policy learner's value.
INHERITED = (
    "num_ranks", "num_cpus_per_rank", "num_gpus_per_rank", "resources_per_rank", "backend", "zero_stage",
    "dtype", "lr",
    "weight_decay", "adam_betas", "adam_eps", "lr_warmup_steps", "lr_schedule", "min_lr_ratio",
    "max_grad_norm", "micro_batch_size", "gradient_checkpointing", "offload_optimizer", "seed",
    "deepspeed_config",
)


class CriticConfig(StrictModel):
    """The value model: the LM with a one-output head on every token (see learner/critic.py)."""

    # reward_model: start from the run's reward model (reward.functions, kind: model; it must share
    # the policy's tokenizer); policy: from the policy's weights with a fresh zero-mean head.
    init: Literal["reward_model", "policy"] = "reward_model"
    model_path: str | None = None  # set: start from this model instead (init is then ignored)
    # separate: ranks in their own placement group. colocate: critic rank i shares policy rank i's
    # bundle (same node; on GPU give both fractional num_gpus_per_rank, e.g. 0.5 each).
    placement: Literal["separate", "colocate"] = "separate"
    # Clipped value loss: a value moves at most this far from its sampling-time value per update
    # (None: plain squared error).
    value_clip: float | None = Field(0.2, gt=0)
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"

    num_ranks: int | None = Field(None, ge=1)
    num_cpus_per_rank: float | None = Field(None, gt=0)
    num_gpus_per_rank: float | None = Field(None, ge=0)
    resources_per_rank: dict[str, float] | None = None  # custom Ray resources (pins ranks to marked nodes)
    backend: Literal["auto", "gloo", "nccl"] | None = None
    zero_stage: int | None = Field(None, ge=0, le=3)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    adam_betas: tuple[float, float] | None = None
    adam_eps: float | None = Field(None, gt=0)
    lr_warmup_steps: int | None = Field(None, ge=0)
    lr_schedule: Literal["constant", "cosine"] | None = None
    min_lr_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(None, ge=0)
    micro_batch_size: int | None = Field(None, ge=1)
    gradient_checkpointing: bool | None = None
    offload_optimizer: bool | None = None
    seed: int | None = None
    deepspeed_config: dict[str, Any] | None = None

    def learner_config(self, policy: LearnerConfig) -> LearnerConfig:
        """The LearnerConfig the critic's ranks run with: unset fields from `policy`, no reference,
        no policy-loss terms (the critic's loss is the value loss)."""
        values = policy.model_dump()
        for key in INHERITED:
            mine = getattr(self, key)
            if mine is not None:
                values[key] = mine
        values["reference"] = False
        values["lora"] = None  # the critic keeps full weights
        values["loss"] = PolicyLossConfig(kl_coef=0.0).model_dump()
        cfg = LearnerConfig.model_validate(values)
        if self.placement == "colocate" and cfg.num_ranks != policy.num_ranks:
            raise ValueError(
                f"critic.placement is 'colocate' but critic.num_ranks={cfg.num_ranks} differs from "
                f"learner.num_ranks={policy.num_ranks}: colocated critic rank i shares policy rank i's "
                "bundle, so leave critic.num_ranks unset (or use placement: separate)"
            )
        return cfg
