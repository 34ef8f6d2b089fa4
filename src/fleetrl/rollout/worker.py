"""One rollout worker: a vLLM engine that samples completions and takes new weights.

A plain class, built and tested in one process; ``fleetrl.rollout.fleet`` wraps it in a Ray actor.
vLLM is imported when a worker is built, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetrl.core.weight_wire import WeightPlan
from fleetrl.rollout.config import RolloutConfig, resolve_device, worker_env
from fleetrl.rollout.weight_receiver import plan_to_plain

# vLLM returns, per sampled token, the logprob under the distribution it sampled from
# only in "processed_logprobs" mode: log_softmax of the logits after temperature, top-k
# and top-p (tokens cut by top-k/top-p get -inf, the sampled one never does). The default
# "raw_logprobs" is the untempered model distribution, which is not the behaviour policy
# when temperature != 1; the *_logits modes return unnormalized scores.
LOGPROBS_MODE = "processed_logprobs"
EXTENSION_CLS = "fleetrl.rollout.weight_receiver.WeightReceiver"

_RESERVED_SAMPLING_KEYS = {"n", "logprobs", "prompt_logprobs", "detokenize", "output_kind"}


@dataclass
class Completion:
    request_id: Any
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # one per token in token_ids, under the sampling distribution
    finish_reason: str | None  # "stop" | "length" | "abort"
    weight_version: int
    worker_index: int


def sampling_params(sampling: dict[str, Any], n: int):
    """vLLM SamplingParams from a ``SamplingConfig``-shaped dict (plus any SamplingParams field)."""
    from vllm import SamplingParams

    clash = sorted(_RESERVED_SAMPLING_KEYS & set(sampling))
    if clash:
        raise ValueError(f"sampling sets {clash}, which the rollout worker sets itself: remove them")
    s = dict(sampling)
    stop = list(s.pop("stop", None) or []) or None
    # Token ids are all the learner needs; detokenizing costs CPU, except that stop
    # strings are matched on text.
    return SamplingParams(n=n, logprobs=0, stop=stop, detokenize=stop is not None, **s)


class RolloutWorker:
    """Owns one ``vllm.LLM`` (tensor parallel inside it) and its weight version."""

    def __init__(self, cfg: RolloutConfig | dict, model_path: str, worker_index: int = 0):
        if isinstance(cfg, dict):
            cfg = RolloutConfig.model_validate(cfg)
        self.cfg = cfg
        self.model_path = model_path
        self.worker_index = worker_index
        self.weight_version = 0

        import torch

        self.device = resolve_device(cfg, torch.cuda.is_available())
        # Before vLLM reads its environment (it spawns the engine process with it).
        os.environ.update(worker_env(cfg, self.device))

        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed + worker_index,
            distributed_executor_backend=cfg.distributed_executor_backend,
            worker_extension_cls=EXTENSION_CLS,
            logprobs_mode=LOGPROBS_MODE,
            **cfg.engine_kwargs,
        )
        self.engine_start_s = time.perf_counter() - t0
        self.num_ranks = self.llm.get_world_size(include_dp=False)
        self.vocab_size = self.llm.model_config.get_vocab_size()
        t0 = time.perf_counter()
        self._warm_up()
        self.warmup_s = time.perf_counter() - t0

    def _warm_up(self) -> None:
        # The first generate of an engine is several times slower than later ones
        # (ENVIRONMENT.md): pay it at start, not on the first training step.
        prompt = [i % self.vocab_size for i in range(1, 9)]
        self.generate([prompt, prompt[:4]], n=2, sampling={"max_tokens": 8}, request_ids=["warmup-0", "warmup-1"])

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        sampling: dict[str, Any],
        request_ids: Sequence[Any],
    ) -> list[Completion]:
        """``n`` samples for each prompt (token ids); completions in prompt order, then sample order."""
        if len(request_ids) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(request_ids)} request_ids")
        if not prompts:
            return []
        from vllm.inputs import TokensPrompt

        params = sampling_params(sampling, n)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        result: list[Completion] = []
        for rid, prompt, out in zip(request_ids, prompts, outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                token_ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(token_ids):
                    raise RuntimeError(
                        f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} logprobs for "
                        f"{len(token_ids)} tokens (request {rid!r}); was logprobs=0 dropped from SamplingParams?"
                    )
                logprobs = [float(c.logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]
                result.append(
                    Completion(
                        request_id=rid,
                        sample_index=c.index,
                        prompt_token_ids=list(prompt),
                        token_ids=token_ids,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        weight_version=self.weight_version,
                        worker_index=self.worker_index,
                    )
                )
        return result

    def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Logprobs (temperature 1, current weights) of a GIVEN completion after ``prompt_ids``."""
        if not prompt_ids or not completion_ids:
            raise ValueError("score needs a non-empty prompt and a non-empty completion")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        plp = out.prompt_logprobs
        start = len(prompt_ids)
        return [float(plp[start + i][tok].logprob) for i, tok in enumerate(completion_ids)]

    # -- weights --------------------------------------------------------------------

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> list[int]:
        """Join the learner's side group; engine rank r becomes rank ``rank_offset + r``.

        Blocks until all ``world_size`` ranks have joined. Returns the ranks taken.
        """
        return self.llm.collective_rpc(
            "init_weight_group", args=(str(host), int(port), int(rank_offset), int(world_size), str(backend))
        )

    def receive_weights(self, plan: WeightPlan | dict) -> dict[str, Any]:
        """Take one version of the weights from the side group (the sender broadcasts it meanwhile)."""
        plain = plan if isinstance(plan, dict) else plan_to_plain(plan)
        t0 = time.perf_counter()
        stats = self.llm.collective_rpc("receive_weights", args=(plain,))
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weight_version = int(plain["version"])
        return {
            "worker_index": self.worker_index,
            "weight_version": self.weight_version,
            "seconds": time.perf_counter() - t0,
            "ranks": stats,
        }

    # -- info -------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {
            "worker_index": self.worker_index,
            "weight_version": self.weight_version,
            "device": self.device,
            "num_gpus": self.num_gpus(),
            "num_ranks": self.num_ranks,
            "engine_start_s": self.engine_start_s,
            "warmup_s": self.warmup_s,
        }

    def get_weight_version(self) -> int:
        return self.weight_version

    def num_gpus(self) -> int:
        if self.device != "cuda":
            return 0
        import torch

        return torch.cuda.device_count()

