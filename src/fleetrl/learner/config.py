"""Config of the DeepSpeed learner (`LearnerConfig`) and of the policy loss it optimizes.

Defaults are the ones a GPU cluster wants; the tiny CPU examples override what they need.
Helpers at the bottom resolve the "auto" values in the process that runs a rank (where
CUDA is or is not visible) and check how a mini-batch splits into micro-batches.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fleetrl.core.strict import StrictModel
from fleetrl.learner.lora import LoraConfig

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class ImportanceSamplingConfig(StrictModel):
    """Off-policy correction (decoupled PPO): the ratio is taken against the learner's own log-probs
    before the update (the proximal policy), and each token's loss is weighted by w = pi_prox / mu,
    mu being the sampler (vLLM) that produced it: staleness and sampler/learner numeric mismatch
    both show up in w. Costs one forward pass of the policy per step; its log-probs also give the
    mismatch metrics. See fleetrl.algos.off_policy."""

    # off: ratio against the sampler's log-probs, no weight (no extra pass, no mismatch metrics);
    # truncate (TIS): w capped at `cap`; mask (MIS): tokens whose w leaves [low, high] are dropped.
    mode: Literal["off", "truncate", "mask"] = "truncate"
    cap: float = Field(2.0, gt=0.0)
    low: float = Field(0.5, ge=0.0, lt=1.0)
    high: float = Field(2.0, gt=1.0)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false


class PolicyLossConfig(StrictModel):
    """The policy loss (a fleetrl.algos POLICY_LOSSES name) plus optional KL and entropy terms."""

    # ppo (clipped surrogate), gspo (sequence-level ratio and clip), cispo (clipped, detached IS
    # weight on every token's log-prob). The online algorithm sets its own when this is unset.
    policy_loss: str = "ppo"
    # The ratio is clipped to [1 - clip_low, 1 + clip_high]; clip_low 1.0 = no lower bound (CISPO).
    clip_low: float = Field(0.2, ge=0.0, le=1.0)
    # clip_high > clip_low is DAPO's clip-higher: low-probability tokens may grow more.
    clip_high: float = Field(0.2, ge=0.0)
    # Dual-clip PPO: caps the loss of negative-advantage tokens at -dual_clip * A. None = off.
    dual_clip: float | None = None
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = Field(0.001, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # "loss": the KL to the reference is a loss term here; "reward": the orchestrator
    # subtracts kl_coef * KL from the rewards and the learner adds nothing.
    kl_in: Literal["loss", "reward"] = "loss"
    entropy_coef: float = 0.0
    importance_sampling: ImportanceSamplingConfig = Field(default_factory=ImportanceSamplingConfig)

    @model_validator(mode="after")
    def _check_policy_loss(self) -> PolicyLossConfig:
        from fleetrl.algos import POLICY_LOSSES  # torch-only; registers every loss

        if self.policy_loss not in POLICY_LOSSES:
            try:
                POLICY_LOSSES.entry(self.policy_loss)
            except KeyError as e:
                raise ValueError(f"learner.loss.policy_loss: {e.args[0]}") from None
        return self

    @model_validator(mode="after")
    def _check_dual_clip(self) -> PolicyLossConfig:
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(
                f"learner.loss.dual_clip must be > 1 (e.g. 3.0) or null to disable it, got {self.dual_clip}"
            )
        return self


class LearnerConfig(StrictModel):
    """One learner = `num_ranks` DeepSpeed ranks (Ray actors) training one policy."""

    num_ranks: int = Field(1, ge=1)
    num_cpus_per_rank: float = Field(1, gt=0)
    # None: 1 GPU per rank when the cluster has GPUs, else 0 (CPU training).
    num_gpus_per_rank: float | None = Field(None, ge=0)
    # Custom Ray resources per rank, e.g. {fleetrl_learner: 1} to keep ranks on learner nodes.
    resources_per_rank: dict[str, float] = Field(default_factory=dict)
    # auto: nccl when the rank sees CUDA, else gloo.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    zero_stage: int = Field(2, ge=0, le=3)
    # auto: bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lr: float = Field(1e-6, gt=0)
    # adamw (betas/eps below) or rmsprop (torch's RMSprop, smoothing 0.99, eps = adam_eps; what the
    # DPO paper trained with). On GPU / with offload_optimizer, adamw is DeepSpeed's own Adam.
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # cosine decays from lr to min_lr_ratio * lr over the run's optimizer steps.
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    micro_batch_size: int = Field(4, ge=1)  # sequences per rank per forward pass
    gradient_checkpointing: bool = False
    # Positions per chunk of the output head in log-prob passes: the micro-batch's [tokens, vocab]
    # logits are never held whole (forward or backward); same values and gradients. 0 = unchunked.
    logprob_chunk_tokens: int = Field(1024, ge=0)
    # Pack samples of different lengths into fewer rows for the log-prob, reference and train passes
    # (learner/packing.py; same losses and gradients as padded rows, less padding computed).
    pack_samples: bool = True
    # torch threads of a CPU rank; None = num_cpus_per_rank (at least 1), what Ray reserves for it.
    num_threads: int | None = Field(None, ge=1)
    offload_optimizer: bool = False
    reference: bool = True  # host a frozen copy of the initial policy for the KL term
    seed: int = 0
    # Merged last into the generated DeepSpeed config (nested dicts merge key by key).
    deepspeed_config: dict[str, Any] = Field(default_factory=dict)
    # 64 MiB: chosen with bench/bench_weight_sync.py (docs/benchmarks.md §2); rank 0 keeps two of them.
    weight_sync_bucket_mb: int = Field(64, ge=1)
    # Deadline of one call on the ranks (a train step over the whole rollout batch, a log-prob pass,
    # a checkpoint): past it the run ends with the ranks that did not answer named, instead of
    # waiting forever on a rank stuck in a collective.
    call_timeout_s: float = Field(3600.0, gt=0)
    loss: PolicyLossConfig = Field(default_factory=PolicyLossConfig)
    # LoRA adapter (r, alpha, dropout, target_modules) instead of full fine-tuning; null = full.
    lora: LoraConfig | None = None

    def cpu_threads(self) -> int:
        """torch/OpenMP threads of one CPU rank."""
        return self.num_threads or max(1, int(round(self.num_cpus_per_rank)))

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.offload_optimizer and self.optimizer != "adamw":
            raise ValueError(
                f"learner.offload_optimizer runs DeepSpeed's CPU Adam, but learner.optimizer is "
                f"'{self.optimizer}': set learner.optimizer: adamw or offload_optimizer: false"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "learner.offload_optimizer needs ZeRO: set learner.zero_stage to 1, 2 or 3 "
                "(or offload_optimizer: false)"
            )
        if not self.reference and self.loss.kl_coef > 0:
            raise ValueError(
                f"learner.loss.kl_coef={self.loss.kl_coef} needs the frozen reference model, but "
                "learner.reference is false: set learner.loss.kl_coef: 0 or learner.reference: true"
            )
        for i, b in enumerate(self.adam_betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"learner.adam_betas[{i}] must be in [0, 1), got {b}")
        return self


# ---------------------------------------------------------------------------------------------
# resolution of "auto" values and batch arithmetic
# ---------------------------------------------------------------------------------------------


def resolve_backend(cfg: LearnerConfig, cuda: bool) -> str:
    if cfg.backend == "auto":
        return "nccl" if cuda else "gloo"
    if cfg.backend == "nccl" and not cuda:
        raise ValueError("learner.backend is 'nccl' but this rank sees no CUDA device: use 'gloo' or 'auto'")
    return cfg.backend


def resolve_dtype(cfg: LearnerConfig, cuda: bool) -> str:
    if cfg.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return cfg.dtype


def micro_steps_per_mini_batch(mini_batch_size: int, world_size: int, micro_batch_size: int) -> int:
    """Gradient-accumulation steps of one optimizer step; raises with the fix when sizes do not divide.

    `mini_batch_size` is global (sequences per optimizer step over all ranks).
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if mini_batch_size % world_size:
        raise ValueError(
            f"mini_batch_size={mini_batch_size} does not split over learner.num_ranks={world_size}: "
            f"make the mini-batch size a multiple of {world_size}"
        )
    per_rank = mini_batch_size // world_size
    if per_rank % micro_batch_size:
        raise ValueError(
            f"mini-batch per rank = mini_batch_size / num_ranks = {mini_batch_size} / {world_size} = "
            f"{per_rank} sequences is not a multiple of learner.micro_batch_size={micro_batch_size}: "
            f"set learner.micro_batch_size to a divisor of {per_rank} or change the mini-batch size"
        )
    return per_rank // micro_batch_size
