"""One rollout worker: a vLLM engine that samples completions and takes new weights.

A plain class, built and tested in one process; ``fleetrl.rollout.fleet`` wraps it in a Ray actor.
vLLM is imported when a worker is built, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetrl.core.nodes import this_node
from fleetrl.core.weight_wire import WeightPlan
from fleetrl.env import ChatDelta, EnvError, TurnOutput, load_environment, run_episode
from fleetrl.rollout.config import MAX_LORAS, RolloutConfig, resolve_device, vllm_lora_rank, worker_env
from fleetrl.rollout.fleet import EngineDead
from fleetrl.rollout.weight_receiver import PARTIAL_RELOAD, plan_to_plain

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
    weight_version: int  # the weights when its first token was sampled (or earlier)
    worker_index: int
    # The weights when its last token was sampled: later than weight_version when a weight update
    # reached the engine mid-generation (an in-flight update).
    last_weight_version: int | None = None
    # Multi-turn episodes: token_ids holds every turn and observation after the prompt; loss_mask
    # is 1 on the policy's tokens, 0 on observation tokens (their logprobs are 0). episode: turns,
    # observation_tokens, env_s, env_error, turn_rewards, messages.
    loss_mask: list[int] | None = None
    episode: dict[str, Any] | None = None


def sampling_params(sampling: dict[str, Any], n: int):
    """vLLM SamplingParams from a ``SamplingConfig``-shaped dict (plus any SamplingParams field)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    clash = sorted(_RESERVED_SAMPLING_KEYS & set(sampling))
    if clash:
        raise ValueError(f"sampling sets {clash}, which the rollout worker sets itself: remove them")
    s = dict(sampling)
    stop = list(s.pop("stop", None) or []) or None
    # Token ids are all the learner needs; detokenizing costs CPU, except that stop
    # strings are matched on text.
    # FINAL_ONLY: one output per request, holding all n samples (streamed outputs of an n > 1
    # request carry only the samples that moved at that step).
    return SamplingParams(n=n, logprobs=0, stop=stop, detokenize=stop is not None,
                          output_kind=RequestOutputKind.FINAL_ONLY, **s)


def engine_kwargs(cfg: RolloutConfig, model_path: str, worker_index: int = 0,
                  lora_rank: int | None = None) -> dict[str, Any]:
    """vLLM engine arguments of worker ``worker_index`` (for ``AsyncEngineArgs`` or ``vllm.LLM``).
    ``lora_rank``: learner.lora.r when the learner trains an adapter (with rollout.lora_sync: adapter
    the engine then serves adapters up to that rank)."""
    lora = {}
    if lora_rank is not None and cfg.lora_sync == "adapter":
        lora = {"enable_lora": True, "max_lora_rank": vllm_lora_rank(lora_rank), "max_loras": MAX_LORAS}
    return {
        "model": model_path,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "dtype": cfg.dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed + worker_index,
        "distributed_executor_backend": cfg.distributed_executor_backend,
        "worker_extension_cls": EXTENSION_CLS,
        "logprobs_mode": LOGPROBS_MODE,
        "disable_log_stats": True,
        **lora,
        **cfg.engine_kwargs,
    }


def adapter_root(worker_index: int, parent: str | None = None) -> str:
    """A fresh directory for this process's adapter versions: worker-local and in memory where there
    is /dev/shm (vLLM reads each adapter back at once). A killed worker cannot clean up after itself,
    so directories left by processes that no longer exist are removed here."""
    if parent is None:  # this user's own directory there: /dev/shm and /tmp are shared
        from fleetrl.core.storage import private_dir

        parent = str(private_dir("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()))
    for old in Path(parent).glob("fleetrl-lora-w*-pid*"):
        pid = old.name.rpartition("-pid")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    root = Path(parent) / f"fleetrl-lora-w{worker_index}-pid{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return str(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """``env`` set in os.environ inside the block; the previous values (or absence) restored after."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RolloutWorker:
    """Owns one vLLM ``AsyncLLM`` engine (tensor parallel inside it) and its weight version.

    Every method is a coroutine: as a Ray actor it is an async actor, so many ``generate`` calls
    run at once and the engine batches all their sequences continuously (a group comes back the
    moment its last sample finishes, while the others keep generating). In one process, drive it
    with ``InProcessWorker``.
    """

    def __init__(self, cfg: RolloutConfig | dict, model_path: str, worker_index: int = 0,
                 lora_rank: int | None = None):
        self._init_state(cfg, model_path, worker_index, lora_rank)
        cfg = self.cfg
        import torch

        self.device = resolve_device(cfg, torch.cuda.is_available())
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        # vLLM reads its environment while it builds the engine and spawns the engine process with
        # it. A fleet's actor has it from its runtime_env already; an in-process worker gets it for
        # the build only, so it does not leak into the rest of the process (a later vllm.LLM there).
        with _environment(worker_env(cfg, self.device)):
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**engine_kwargs(cfg, model_path, worker_index, lora_rank)))
        self.engine_start_s = time.perf_counter() - t0
        self.warmup_s = 0.0
        self.num_ranks = self.engine.vllm_config.parallel_config.world_size
        self.vocab_size = self.engine.model_config.get_vocab_size()

    def _init_state(self, cfg: RolloutConfig | dict, model_path: str, worker_index: int,
                    lora_rank: int | None) -> None:
        """Everything but the engine (tests drive the request and update logic over a stand-in engine)."""
        if isinstance(cfg, dict):
            cfg = RolloutConfig.model_validate(cfg)
        self.cfg = cfg
        self.model_path = model_path
        self.worker_index = worker_index
        self.weight_version = 0
        self.prefix_cache_resets: dict[int, int] = {}  # weight version -> resets after its loads
        # rollout.lora_sync: adapter (with learner.lora): each version is a LoRA adapter the engine
        # serves; the base weights never change. _lora: the current version's LoRARequest (None: the
        # base model, version 0); _lora_users: requests in flight per adapter id (an old adapter is
        # removed when its last request ends).
        self.adapter_mode = lora_rank is not None and cfg.lora_sync == "adapter"
        self._lora = None
        self._lora_users: dict[int, int] = {}
        self._lora_ids = itertools.count(1)
        self._adapter_root: str | None = None
        self.weight_updates_in_flight = 0  # syncs that found requests in flight (they went on)
        self._requests = itertools.count()
        self._inflight = 0
        # rollout.weight_update: drain. _admit is cleared while an update waits for the requests in
        # flight (new ones wait for the new weights); _idle is set when none is in flight. fleetrl
        # drains them itself rather than relying on vLLM's pause(mode="wait") alone: that returns
        # once the engine has finished them, possibly before their final outputs reach us, and a
        # request must read its last version before the update changes it.
        self._admit = asyncio.Event()
        self._admit.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._warm: asyncio.Task | None = None
        # Set when a weight reload failed after it began: the model may hold two versions at once,
        # so this worker never serves again (EngineDead: the fleet replaces it).
        self._broken: str | None = None
        self._env: asyncio.Future | None = None  # -> (environment class, chat delta), built on first use

    async def _warm_up(self) -> None:
        # The first generate of an engine is several times slower than later ones
        # (ENVIRONMENT.md): pay it at start (ping), not on the first training step.
        t0 = time.perf_counter()
        prompt = [i % self.vocab_size for i in range(1, 9)]
        await self.generate([prompt, prompt[:4]], n=2, sampling={"max_tokens": 8},
                            request_ids=["warmup-0", "warmup-1"])
        self.warmup_s = time.perf_counter() - t0

    async def ready(self) -> None:
        """Warm the engine up once (every caller waits for the same warm-up)."""
        if self._warm is None:
            self._warm = asyncio.ensure_future(self._warm_up())
        await self._warm

    # -- generation -------------------------------------------------------------------

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        sampling: dict[str, Any],
        request_ids: Sequence[Any],
        rows: Sequence[dict[str, Any]] | None = None,
    ) -> list[Completion]:
        """``n`` samples for each prompt (token ids); completions in prompt order, then sample order.
        With ``rollout.environment`` and the prompts' data ``rows``, each sample is an episode."""
        if len(request_ids) != len(prompts):
            raise ValueError(f"generate got {len(prompts)} prompts but {len(request_ids)} request_ids")
        if not prompts:
            return []
        if self.cfg.environment is not None and rows is not None:
            episodes = [self._episode(rid, i, p, row, sampling)
                        for rid, p, row in zip(request_ids, prompts, rows) for i in range(n)]
            return list(await asyncio.gather(*episodes))
        params = sampling_params(sampling, n)
        async with self._engine_alive():
            per_prompt = await asyncio.gather(*(self._sample(rid, p, self._params_for(rid, params))
                                                for rid, p in zip(request_ids, prompts)))
        return [c for group in per_prompt for c in group]

    def _params_for(self, rid: Any, params):
        """rollout.seed_per_request: the request's own seed, from rollout.seed and its id (a prompt
        index), so its samples do not depend on what the engine generated before."""
        if not self.cfg.seed_per_request or params.seed is not None:
            return params
        seeded = params.clone()
        seeded.seed = zlib.crc32(f"{self.cfg.seed}:{rid}".encode()) & 0x7FFFFFFF
        return seeded

    @contextlib.asynccontextmanager
    async def _engine_alive(self):
        """vLLM's EngineDeadError (the engine process died; this actor lives on) becomes EngineDead,
        which the fleet reads as a dead worker: its prompts go to the others and it is replaced."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:
            raise EngineDead(f"rollout worker {self.worker_index}: its vLLM engine is dead "
                             f"({self.engine.dead_error}); the fleet replaces this worker")
        if self._broken:
            raise EngineDead(f"rollout worker {self.worker_index}: {self._broken}; the fleet replaces this worker")
        try:
            yield
        except EngineDeadError as e:
            raise EngineDead(f"rollout worker {self.worker_index}: its vLLM engine died ({e}); the fleet "
                             "replaces this worker") from e

    async def _sample(self, rid: Any, prompt: Sequence[int], params) -> list[Completion]:
        """All samples of one prompt: one engine request (vLLM fans it out to params.n sequences)."""
        from vllm.inputs import TokensPrompt

        if not self._admit.is_set():  # a drain is waiting for the requests in flight
            await asyncio.wait_for(self._admit.wait(), timeout=self.cfg.weight_sync_timeout_s)
        first_version = self.weight_version  # the oldest weights any of its tokens can come from
        lora = self._lora  # adapter mode: the request keeps this adapter (its version) to the end
        final = None
        self._inflight += 1
        self._idle.clear()
        self._hold_adapter(lora)
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt)), params,
                                                  request_id=f"w{self.worker_index}-{next(self._requests)}",
                                                  lora_request=lora):
                final = out
            # The weights of its last token: read before a drained update may change the version.
            last_version = first_version if self.adapter_mode else self.weight_version
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            await self._drop_adapter(lora)
        result = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            token_ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(token_ids):
                raise RuntimeError(
                    f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} logprobs for "
                    f"{len(token_ids)} tokens (request {rid!r}); was logprobs=0 dropped from SamplingParams?"
                )
            result.append(Completion(
                request_id=rid,
                sample_index=c.index,
                prompt_token_ids=list(prompt),
                token_ids=token_ids,
                logprobs=[float(c.logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)],
                finish_reason=c.finish_reason,
                weight_version=first_version,
                last_weight_version=last_version,
                worker_index=self.worker_index,
            ))
        return result

    async def _episode(self, rid: Any, sample_index: int, prompt: Sequence[int], row: dict[str, Any],
                       sampling: dict[str, Any]) -> Completion:
        """One multi-turn episode: a coroutine of its own, so a slow environment holds up only it."""
        if self._env is None:
            self._env = asyncio.ensure_future(self._build_env())
        env_cls, delta = await self._env

        async def turn(ids: list[int], max_tokens: int) -> TurnOutput:
            c = (await self._sample(rid, ids, sampling_params({**sampling, "max_tokens": max_tokens}, 1)))[0]
            return TurnOutput(c.token_ids, c.logprobs, c.finish_reason, c.weight_version, c.last_weight_version)

        r = await run_episode(env_cls(**self.cfg.episode.env_kwargs), row, list(prompt), turn, delta,
                              self.cfg.episode, int(sampling.get("max_tokens", 1024)),
                              name=f"episode {sample_index} of prompt {rid!r} (rollout worker {self.worker_index})")
        ep = r.episode
        return Completion(
            request_id=rid, sample_index=sample_index, prompt_token_ids=ep.prompt_ids, token_ids=ep.completion_ids,
            logprobs=ep.logprobs, finish_reason=r.finish_reason, weight_version=r.weight_version,
            last_weight_version=r.last_weight_version, worker_index=self.worker_index, loss_mask=ep.loss_mask,
            episode={"turns": ep.num_turns, "observation_tokens": ep.observation_tokens, "env_s": r.env_s,
                     "env_error": r.error, "turn_rewards": ep.turn_rewards, "messages": ep.messages},
        )

    async def _build_env(self) -> tuple[type, ChatDelta]:
        """The environment class and the chat delta, once per worker; the environment's preflight runs
        here too (this node may lack what the driver's check found, e.g. a working sandbox), and its
        failure fails every episode of this worker, whatever rollout.episode.on_error says."""
        from transformers import AutoTokenizer

        env_cls = load_environment(self.cfg.environment)
        env = env_cls(**self.cfg.episode.env_kwargs)
        preflight = getattr(env, "preflight", None)
        if callable(preflight):
            try:
                await asyncio.to_thread(preflight)
            except Exception as e:
                raise RuntimeError(f"rollout worker {self.worker_index}: environment {self.cfg.environment} cannot "
                                   f"run on this node: {type(e).__name__}: {e}") from e
        delta = ChatDelta(AutoTokenizer.from_pretrained(self.model_path))
        if getattr(env, "tools", None):
            try:
                delta.check_tools(env.tools)
            except ValueError as e:  # the same on every node and restart: EnvError is not restartable
                raise EnvError(f"rollout worker {self.worker_index}: environment {self.cfg.environment}: {e}") from e
        return env_cls, delta

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Logprobs (temperature 1, current weights) of a GIVEN completion after ``prompt_ids``."""
        if not prompt_ids or not completion_ids:
            raise ValueError("score needs a non-empty prompt and a non-empty completion")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        lora = self._lora
        self._hold_adapter(lora)
        try:
            async with self._engine_alive():  # a dead engine is EngineDead, as for generate: the worker is replaced
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                      request_id=f"w{self.worker_index}-score-{next(self._requests)}",
                                                      lora_request=lora):
                    final = out
        finally:
            await self._drop_adapter(lora)
        plp = final.prompt_logprobs
        start = len(prompt_ids)
        return [float(plp[start + i][tok].logprob) for i, tok in enumerate(completion_ids)]

    async def probe(self, ids: Sequence[int]) -> dict[str, Any]:
        """The weight check's log-prob probe (``fleetrl.online.weights``): the log-prob of each of
        ``ids[1:]`` after the ones before it, under the weights loaded now, and the model's dtype."""
        logprobs = await self.score(ids[:1], ids[1:])
        return {"logprobs": logprobs, "dtype": str(self.engine.model_config.dtype).removeprefix("torch.")}

    # -- weights --------------------------------------------------------------------

    async def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int,
                                backend: str) -> list[int]:
        """Join the learner's side group; engine rank r becomes rank ``rank_offset + r``.

        Blocks until all ``world_size`` ranks have joined. Returns the ranks taken.
        """
        return await self.engine.collective_rpc(
            "init_weight_group", args=(str(host), int(port), int(rank_offset), int(world_size), str(backend))
        )

    async def receive_weights(self, plan: WeightPlan | dict) -> dict[str, Any]:
        """Take one version of the weights from the side group (the sender broadcasts it meanwhile).

        ``rollout.weight_update: in_flight``: the engine pauses between two of its steps (vLLM's
        ``pause_generation`` in keep mode), loads the weights, drops its KV cache (computed with
        the old weights) and resumes: requests in flight go on under the new weights (a partial
        rollout); their tokens after this point record the new version
        (``Completion.last_weight_version``). ``drain``: requests in flight finish first under the
        old weights; new ones wait for the new weights.
        """
        plain = plan if isinstance(plan, dict) else plan_to_plain(plan)
        if self.adapter_mode and plain.get("lora_scale") is not None:
            return await self._receive_adapter(plain)
        t0 = time.perf_counter()
        inflight = self._inflight
        mode = "keep" if self.cfg.weight_update == "in_flight" else "wait"
        async with self._engine_alive():
            # Idle: nothing may enter while the engine pauses (so the pause may skip vLLM's wait for
            # outputs in flight, _pause); no await between the check and the clear.
            if mode == "wait" or self._inflight == 0:
                self._admit.clear()
            try:
                if mode == "wait":
                    await self._drained(int(plain["version"]))
                marks = [time.perf_counter()]  # phases of the sync, for the bench: pause, load, reset, resume
                await self._pause(mode)
                marks.append(time.perf_counter())
                try:
                    # Checked only for full weights: a merged LoRA plan carries the adapter, not what loads.
                    verify = self.cfg.verify_weights and plain.get("lora_scale") is None
                    try:
                        stats = await self.engine.collective_rpc("receive_weights", args=(plain, verify))
                    except Exception as e:
                        if PARTIAL_RELOAD not in str(e):
                            raise
                        # Neither version is whole in this engine: it stays paused (requests in flight
                        # go nowhere) and every call from now on raises EngineDead.
                        self._broken = (f"its weight reload of version {plain['version']} failed halfway "
                                        f"({str(e).splitlines()[0][:300]})")
                        raise EngineDead(f"rollout worker {self.worker_index}: {self._broken}; the fleet "
                                         "replaces this worker") from e
                    marks.append(time.perf_counter())
                    self.weight_version = int(plain["version"])
                    # The pause dropped the KV and prefix caches before the load; drop them again
                    # now, so that no prefix computed with older weights can be served after it.
                    if not await self.engine.reset_prefix_cache(reset_running_requests=True):
                        raise RuntimeError(f"rollout worker {self.worker_index}: vLLM could not reset its prefix "
                                           f"cache after loading weight version {self.weight_version}")
                    self.prefix_cache_resets[self.weight_version] = (
                        self.prefix_cache_resets.get(self.weight_version, 0) + 1)
                    marks.append(time.perf_counter())
                finally:
                    if not self._broken:
                        await self.engine.resume_generation()
                marks.append(time.perf_counter())
            finally:
                self._admit.set()
        self.weight_updates_in_flight += int(inflight > 0 and mode == "keep")
        report = self._sync_report(t0, inflight, stats)
        report["phases_s"] = {name: b - a for name, a, b in zip(("pause", "load", "reset", "resume"), marks, marks[1:])}
        return report

    async def time_reload(self) -> float:
        """Benches: the seconds of one reload of the last weights received, already all in memory
        (``WeightReceiver.time_reload``; the slowest rank)."""
        async with self._engine_alive():
            return max(await self.engine.collective_rpc("time_reload"))

    async def _pause(self, mode: str) -> None:
        """vLLM's ``pause_generation`` ends with a fixed 20 ms sleep, so that the outputs of requests in
        flight are processed before it returns. With none in flight and none admitted (``_admit``
        cleared) there is nothing to wait for: the same pause of the scheduler, without the sleep."""
        core, renderer = getattr(self.engine, "engine_core", None), getattr(self.engine, "renderer", None)
        # vLLM internals (AsyncLLM of vLLM 0.32): a vLLM without them takes the public pause.
        internal = hasattr(core, "pause_scheduler_async") and hasattr(renderer, "clear_mm_cache_async")
        if self._inflight or self._admit.is_set() or not internal:
            await self.engine.pause_generation(mode=mode, clear_cache=True)
            return
        await renderer.clear_mm_cache_async()
        await core.pause_scheduler_async(mode=mode, clear_cache=True)

    async def _drained(self, version: int) -> None:
        """rollout.weight_update: drain: wait (within rollout.weight_sync_timeout_s) until the requests
        in flight have finished and read their weight version."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.cfg.weight_sync_timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"rollout worker {self.worker_index}: {self._inflight} request(s) in flight did not finish "
                f"within rollout.weight_sync_timeout_s={self.cfg.weight_sync_timeout_s:g}s, so weight version "
                f"{version} (rollout.weight_update: drain) was not loaded") from None

    def _sync_report(self, t0: float, inflight: int, stats: Any) -> dict[str, Any]:
        """What a weight sync returns to the fleet (both sync modes)."""
        t1 = time.perf_counter()
        return {
            "worker_index": self.worker_index,
            "weight_version": self.weight_version,
            "seconds": t1 - t0,
            "t_start": t0, "t_end": t1,  # CLOCK_MONOTONIC: comparable with the learner's on one node
            "requests_in_flight": inflight,
            "ranks": stats,
        }

    async def _receive_adapter(self, plain: dict[str, Any]) -> dict[str, Any]:
        """rollout.lora_sync: adapter. No pause: the vLLM workers take the broadcast between two engine
        steps and write the adapter; new requests then use it, requests in flight finish on theirs."""
        t0 = time.perf_counter()
        version = int(plain["version"])
        lora_id = next(self._lora_ids)
        if self._adapter_root is None:
            self._adapter_root = adapter_root(self.worker_index)
        path = os.path.join(self._adapter_root, f"v{version}-{lora_id}")
        inflight = self._inflight
        from vllm.v1.engine.exceptions import EngineDeadError

        async with self._engine_alive():
            try:
                stats = await self.engine.collective_rpc("receive_adapter", args=(plain, path))
            except EngineDeadError:
                raise
            except Exception as e:
                raise RuntimeError(
                    f"rollout worker {self.worker_index}: receiving the LoRA adapter of weight version {version} "
                    f"into {path} failed: {type(e).__name__}: {e}. It keeps serving version "
                    f"{self.weight_version}") from e
            await self.load_adapter(version, path, lora_id)
        return self._sync_report(t0, inflight, stats)

    async def load_adapter(self, version: int, path: str, lora_id: int | None = None) -> int:
        """Serve the PEFT adapter at ``path`` as weight ``version`` from now on (adapter mode); the
        previous version is removed once no request uses it. Returns the adapter's vLLM id."""
        from vllm.lora.request import LoRARequest

        if not self.adapter_mode:
            raise RuntimeError(f"rollout worker {self.worker_index}: load_adapter needs rollout.lora_sync: adapter "
                               "and learner.lora (the engine was started without enable_lora)")
        lora_id = next(self._lora_ids) if lora_id is None else lora_id
        request = LoRARequest(f"v{version}-{lora_id}", lora_id, str(path))
        try:
            await self.engine.add_lora(request)
        except Exception as e:
            if self._adapter_root is not None and Path(path).parent == Path(self._adapter_root):
                shutil.rmtree(path, ignore_errors=True)  # ours, and never to be used
            raise RuntimeError(
                f"rollout worker {self.worker_index}: vLLM could not load the LoRA adapter of weight version "
                f"{version} from {path}: {type(e).__name__}: {e}. It keeps serving version {self.weight_version}. "
                "Check that learner.lora.target_modules are linear layers vLLM adapts for this model "
                "(or use rollout.lora_sync: merged)") from e
        old, self._lora, self.weight_version = self._lora, request, int(version)
        await self._release_adapter(old)
        return lora_id

    def _hold_adapter(self, lora) -> None:
        if lora is not None:
            self._lora_users[lora.lora_int_id] = self._lora_users.get(lora.lora_int_id, 0) + 1

    async def _drop_adapter(self, lora) -> None:
        """A request on ``lora`` ended: release the adapter if it was the last one on an old version."""
        if lora is not None:
            self._lora_users[lora.lora_int_id] -= 1
            await self._release_adapter(lora)

    async def _release_adapter(self, lora) -> None:
        """Drop an adapter that is neither current nor used by a request in flight (engine and disk)."""
        if lora is None or lora is self._lora or self._lora_users.get(lora.lora_int_id, 0) > 0:
            return
        self._lora_users.pop(lora.lora_int_id, None)
        with contextlib.suppress(Exception):  # a dead engine has nothing left to remove
            await self.engine.remove_lora(lora.lora_int_id)
        shutil.rmtree(lora.lora_path, ignore_errors=True)

    # -- info -------------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        """The worker's facts, once its engine is warm (the fleet's readiness probe); EngineDead
        when its engine died."""
        async with self._engine_alive():
            await self.ready()
        return {
            "worker_index": self.worker_index,
            "weight_version": self.weight_version,
            "device": self.device,
            "num_gpus": self.num_gpus(),
            "num_ranks": self.num_ranks,
            "engine_start_s": self.engine_start_s,
            "warmup_s": self.warmup_s,
            "requests_in_flight": self._inflight,
            "weight_updates_in_flight": self.weight_updates_in_flight,
            "prefix_cache_resets": dict(self.prefix_cache_resets),
            **this_node(),
        }

    async def get_weight_version(self) -> int:
        return self.weight_version

    def close(self) -> None:
        """Remove this worker's adapter files (adapter mode)."""
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

    def num_gpus(self) -> int:
        if self.device != "cuda":
            return 0
        import torch

        return torch.cuda.device_count()



class InProcessWorker:
    """A ``RolloutWorker`` driven from synchronous code in this process (tests, benchmarks).

    The worker's coroutines run on one event loop in a background thread (vLLM's output
    handler is bound to the loop that first generates); each method here waits for its result.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-worker-loop", daemon=True)
        self._thread.start()
        self.worker = self._run(self._build(*args, **kwargs))
        self._run(self.worker.ready())

    @staticmethod
    async def _build(*args: Any, **kwargs: Any) -> RolloutWorker:
        return RolloutWorker(*args, **kwargs)

    async def _shutdown_engine(self) -> None:
        import gc

        self.worker.engine.shutdown()
        # Collected here, not at interpreter exit (where AsyncLLM.__del__ finds its modules gone).
        del self.worker.engine
        gc.collect()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str):
        attr = getattr(self.worker, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self._run(attr(*args, **kwargs))

    def submit(self, method: str, *args: Any, **kwargs: Any):
        """Start a coroutine method without waiting: a concurrent.futures.Future of its result."""
        return asyncio.run_coroutine_threadsafe(getattr(self.worker, method)(*args, **kwargs), self._loop)

    def shutdown(self) -> None:
        self.worker.close()
        self._run(self._shutdown_engine())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
