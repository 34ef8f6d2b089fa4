"""Configuration of the rollout service: the vLLM engines and how they sample.

Defaults are for a real GPU cluster; the tiny CPU examples and tests override
``device``, ``max_model_len``, ``enforce_eager``, ``dtype`` and ``cpu_kvcache_space_gb``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fleetrl.core.strict import EnvStr, StrictModel
from fleetrl.env.config import EpisodeConfig


class SamplingConfig(StrictModel):
    """How completions are sampled (passed to vLLM's ``SamplingParams``)."""

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1  # -1 (or 0): all tokens
    max_tokens: int = Field(1024, ge=1)
    stop: list[str] = Field(default_factory=list)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"rollout.sampling.top_k must be -1 (all tokens) or >= 1, got {v}")
        return v


class RolloutConfig(StrictModel):
    """One vLLM engine per worker; ``num_workers`` of them form the fleet."""

    num_workers: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1, ge=0)
    # Custom Ray resources per worker, e.g. {fleetrl_rollout: 1} to pin workers to rollout nodes
    # (deploy/ marks those nodes with it; see docs/cluster.md).
    resources: dict[str, float] = Field(default_factory=dict)
    # None: tensor_parallel_size GPUs on CUDA (0 when vLLM's own "ray" executor places
    # the GPU workers), 0 on CPU.
    num_gpus_per_worker: float | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(4096, ge=1)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    enforce_eager: bool = False
    # GiB of KV cache for the vLLM CPU backend (exported as VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_space_gb: int = Field(4, ge=1)
    # Generate calls in flight on one worker at most. The engine batches all of them continuously
    # (each is one prompt group, back the moment its last sample ends), so this is how full the
    # engine is kept: enough groups to fill its batch (vLLM's max_num_seqs: 256 on GPU) in sequences.
    max_inflight_per_worker: int = Field(32, ge=1)
    # How new weights reach an engine with requests in flight: in_flight pauses it between two
    # steps, loads, and resumes the same requests under the new weights (a partial rollout: its
    # tokens record both versions); drain lets the running requests finish first (no new ones start).
    weight_update: Literal["in_flight", "drain"] = "in_flight"
    # With learner.lora only the adapter travels. merged: each worker merges it into the base
    # weights it keeps (read from the model directory) and reloads. adapter: the engine runs with
    # vLLM's enable_lora and serves each version as a LoRA adapter (no base-weight reload; requests
    # in flight finish on the adapter they started with).
    lora_sync: Literal["merged", "adapter"] = "merged"
    # Deadlines. A worker whose engine has not started and warmed up within ready_timeout_s fails
    # the start with what the cluster lacks; a generate call older than generate_timeout_s means
    # its engine is hung: the worker is removed (its prompts go to the others) and replaced at the
    # next step; a weight sync that does not finish within weight_sync_timeout_s names who did not
    # answer.
    ready_timeout_s: float = Field(900.0, gt=0)
    generate_timeout_s: float = Field(1800.0, gt=0)
    weight_sync_timeout_s: float = Field(600.0, gt=0)
    # After every weight sync each worker reads its model's parameters back and their checksums are
    # compared with the learner's (fleetrl.core.weight_check). A mismatch sends the version again, up
    # to verify_weights_retries times (each counted in weight_sync/verify_failed); then the run fails.
    # Then (every verify_probe_every versions) the log-prob probe: the first verify_probe_tokens
    # tokens of the training prompts are scored by every worker and by the learner; a mean absolute
    # log-prob difference over verify_probe_tolerance (None: set by the dtypes, 0.01 for fp32, 0.05
    # fp16, 0.1 bf16) fails the check like a checksum mismatch. It sees what checksums cannot:
    # weights the engine cannot read back (CPU oneDNN-packed linears), values moved inside a tensor,
    # LoRA adapters. 0 tokens: no probe. By default the sync does not wait for the probe (the learner
    # and the workers score it while the next step begins): it is compared at the next sync, and a
    # failure is counted and makes the next version's probe one the sync waits for.
    # verify_probe_wait: always wait (the probe's time is then on the sync's critical path).
    verify_weights: bool = True
    verify_weights_retries: int = Field(1, ge=0)
    verify_probe_tokens: int = Field(32, ge=0)
    verify_probe_every: int = Field(1, ge=1)
    verify_probe_tolerance: float | None = Field(None, gt=0)
    verify_probe_wait: bool = False
    # Worker i's engine uses seed + i, so workers given the same prompt sample differently.
    seed: int = 0
    # Exact resume: each request samples from its own seed (derived from seed and the prompt's
    # index), so a prompt's samples do not depend on what the engine generated before (a restarted
    # engine resets its generator). Off by default: per-request generators cost sampling speed.
    seed_per_request: bool = False
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    # Extra environment variables for each worker actor (e.g. VLLM_CPU_OMP_THREADS_BIND). Values are
    # strings; numbers are kept as written (an override's 1e3 stays "1e3") and bools become "1"/"0".
    env_vars: dict[str, EnvStr] = Field(default_factory=dict)
    # Anything else for vllm.LLM(...), passed through unchanged.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # Multi-turn episodes: 'path/to/env.py:ClassName' (relative to the config file) or
    # 'package.module:ClassName', a fleetrl.env.Environment; None = one completion per sample.
    environment: str | None = None
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig)

    @model_validator(mode="after")
    def _episode_fits(self) -> RolloutConfig:
        if self.environment is not None and self.episode.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"rollout.episode.max_total_tokens={self.episode.max_total_tokens} exceeds rollout.max_model_len="
                f"{self.max_model_len}: an episode must fit the engine's context; lower it or raise max_model_len")
        return self

    @model_validator(mode="after")
    def _engine_kwargs_do_not_shadow(self) -> RolloutConfig:
        owned = {
            "model", "tensor_parallel_size", "max_model_len", "dtype", "gpu_memory_utilization",
            "enforce_eager", "seed", "distributed_executor_backend", "worker_extension_cls",
            "logprobs_mode", "enable_lora", "max_lora_rank",
        }
        clash = sorted(owned & set(self.engine_kwargs))
        if clash:
            raise ValueError(
                f"rollout.engine_kwargs sets {clash}, which fleetrl sets itself: use the rollout.* field "
                "of the same name instead (worker_extension_cls and logprobs_mode are fixed by fleetrl; "
                "enable_lora and max_lora_rank follow rollout.lora_sync and learner.lora.r)"
            )
        return self


# The ranks a vLLM engine can be built for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Adapters one engine batch may mix: the current version and the one requests in flight started on.
MAX_LORAS = 2


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"learner.lora.r={r} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]}): "
                     "lower it, or use rollout.lora_sync: merged (no rank limit)")


def resolve_device(cfg: RolloutConfig, gpu_available: bool) -> str:
    """'cpu' or 'cuda'. ``gpu_available`` is asked of the place the engine will run."""
    if cfg.device == "auto":
        return "cuda" if gpu_available else "cpu"
    if cfg.device == "cuda" and not gpu_available:
        raise RuntimeError(
            "rollout.device is 'cuda' but no GPU is visible here: set rollout.device to 'cpu' "
            "(with the vllm-cpu build) or run the workers on GPU nodes"
        )
    return cfg.device


def gpus_per_worker(cfg: RolloutConfig, device: str) -> float:
    """GPUs to reserve for one worker actor."""
    if cfg.num_gpus_per_worker is not None:
        return cfg.num_gpus_per_worker
    if device != "cuda":
        return 0
    # vLLM's "ray" executor places its own GPU workers; the actor only drives them.
    if cfg.distributed_executor_backend == "ray":
        return 0
    return cfg.tensor_parallel_size


def worker_env(cfg: RolloutConfig, device: str) -> dict[str, str]:
    """Environment variables a worker process needs before vLLM is imported."""
    env = dict(cfg.env_vars)
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gb))
        if cfg.tensor_parallel_size == 1 and cfg.distributed_executor_backend is None:
            # vLLM's CPU platform otherwise runs the model in a third process (its "mp" executor, for
            # OpenMP core binding): one more interpreter importing vLLM (~8 s of start-up on 2 cores)
            # and one more process polling between engine core and model. With this, the model runs
            # inside the engine core process on OMP_NUM_THREADS threads (Ray: num_cpus_per_worker).
            # rollout.env_vars {VLLM_ENABLE_V1_MULTIPROCESSING: "1"} restores vLLM's binding.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env
