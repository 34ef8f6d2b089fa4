"""The rollout fleet: N ``RolloutWorker`` Ray actors behind one load balancer.

``FleetBook`` holds all of the logic (which worker gets a call, what is in flight, what
comes back when a worker leaves, what a call lost with a dead worker means) and talks to
workers only through injected functions, so it is tested without Ray. ``RolloutFleet`` plugs
Ray into it. Callers collect a finished call with ``RolloutFleet.finish(ref)``: completions, or
word that its worker died (the fleet has already taken that worker out) and the prompts must be
submitted again.

Weight-sync ranks: the learner is rank 0 of the side group; the workers follow in index
order, each taking as many ranks as its engine has processes (tensor x pipeline parallel).
Adding or removing a worker changes that layout, so the group must then be built again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from fleetrl.core.console import quiet_env
from fleetrl.core.weight_wire import WeightPlan
from fleetrl.rollout.config import RolloutConfig, gpus_per_worker, resolve_device, worker_env

# call(handle, method_name, *args) -> a future (a Ray ObjectRef); futures must be hashable.
CallFn = Callable[..., Hashable]
# wait(futures, timeout_s) -> the futures among them that are done.
WaitFn = Callable[[list, float | None], list]


class EngineDead(RuntimeError):
    """A worker's vLLM engine died while its actor lives (vLLM's EngineDeadError): the worker is dead."""


class NoCapacity(RuntimeError):
    """Every worker already has max_inflight_per_worker calls queued."""


class WorkerBusy(RuntimeError):
    """A worker cannot be removed while calls are in flight on it (unless asked to wait)."""


@dataclass
class Work:
    """One generate call: enough to submit it again elsewhere if its worker goes away."""

    worker_index: int
    prompts: list[list[int]]
    n: int
    sampling: dict[str, Any]
    request_ids: list[Any]
    submitted_at: float


@dataclass
class Finished:
    """A generate call that finished: its completions, or ``lost`` when its worker died.

    ``dead_worker`` is the index of the worker this call revealed as dead (taken out of the fleet
    now); None when the call succeeded or its worker was already gone (its other lost calls).
    """

    work: Work | None
    completions: list | None = None
    dead_worker: int | None = None
    error: BaseException | None = None

    @property
    def lost(self) -> bool:
        return self.error is not None


class FleetBook:
    """Load balancing and in-flight bookkeeping for a set of workers, transport-agnostic.

    ``dead_errors``: exception types that mean "the worker is gone" when a call's result is read
    (Ray: RayActorError); a call failing with one is lost, not an error of the run.
    """

    def __init__(self, max_inflight_per_worker: int, call: CallFn, ranks_per_worker: int = 1,
                 dead_errors: tuple[type[BaseException], ...] = ()):
        if max_inflight_per_worker < 1:
            raise ValueError("max_inflight_per_worker must be >= 1")
        self.max_inflight = max_inflight_per_worker
        self.ranks_per_worker = ranks_per_worker
        self.dead_errors = dead_errors
        self._call = call
        self._handles: dict[int, Any] = {}
        self._inflight: dict[int, dict[Hashable, Work]] = {}
        self._draining: set[int] = set()
        self._where: dict[Hashable, int] = {}
        # Futures of removed workers that finished while we waited: still claimable by on_done.
        self._finished_orphans: dict[Hashable, Work] = {}
        self._last_pick: dict[int, int] = {}
        self._pick_seq = itertools.count()
        self._next_index = 0
        self._group_members: tuple[int, ...] | None = None

    # -- membership -----------------------------------------------------------------

    def next_index(self) -> int:
        """Index for a new worker; never reused, so actor names never collide."""
        return self._next_index

    def add(self, handle: Any, index: int | None = None) -> int:
        index = self._next_index if index is None else index
        if index in self._handles:
            raise ValueError(f"worker index {index} is already in the fleet")
        self._handles[index] = handle
        self._inflight[index] = {}
        self._last_pick[index] = -1
        self._next_index = max(self._next_index, index + 1)
        return index

    def indices(self) -> list[int]:
        return sorted(self._handles)

    def handle(self, index: int) -> Any:
        if index not in self._handles:
            raise KeyError(f"no rollout worker with index {index}; the fleet has {self.indices()}")
        return self._handles[index]

    def remove(
        self, index: int, wait: bool = False, timeout_s: float | None = None, wait_fn: WaitFn | None = None
    ) -> tuple[Any, list[Work]]:
        """Take worker ``index`` out of the fleet; returns (its handle, its unfinished work).

        With calls in flight: refused unless ``wait``; then no new call goes to it, and
        ``wait_fn`` waits up to ``timeout_s`` for them. Those that finish can still be
        claimed with ``on_done``; those that do not are returned so the caller can submit
        them again (the handle is about to be killed, their futures will never resolve).
        """
        handle = self.handle(index)
        pending = self._inflight[index]
        if pending and not wait:
            rids = [rid for w in pending.values() for rid in w.request_ids]
            raise WorkerBusy(
                f"rollout worker {index} has {len(pending)} generate calls in flight (request ids "
                f"{rids[:8]}{'...' if len(rids) > 8 else ''}): call remove_worker({index}, wait=True) to let "
                "them finish (unfinished ones are handed back), or collect them with on_done first"
            )
        done: set[Hashable] = set()
        if pending:
            if wait_fn is None:
                raise ValueError("remove(wait=True) with calls in flight needs a wait_fn")
            self._draining.add(index)
            done = set(wait_fn(list(pending), timeout_s))
        unfinished = []
        for fut, work in pending.items():
            del self._where[fut]
            if fut in done:
                self._finished_orphans[fut] = work
            else:
                unfinished.append(work)
        del self._handles[index], self._inflight[index], self._last_pick[index]
        self._draining.discard(index)
        return handle, unfinished

    # -- generation -----------------------------------------------------------------

    def inflight(self, index: int | None = None) -> int:
        if index is not None:
            return len(self._inflight[index])
        return sum(len(p) for p in self._inflight.values())

    def idle_capacity(self) -> int:
        """How many more generate calls can be submitted right now."""
        return sum(
            self.max_inflight - len(p) for i, p in self._inflight.items() if i not in self._draining
        )

    def pick(self) -> int | None:
        """The worker for the next call: fewest in flight, then longest since its last call."""
        open_ = [
            i for i, p in self._inflight.items() if i not in self._draining and len(p) < self.max_inflight
        ]
        if not open_:
            return None
        return min(open_, key=lambda i: (len(self._inflight[i]), self._last_pick[i], i))

    def submit(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: dict[str, Any], request_ids: Sequence[Any],
        rows: Sequence[dict[str, Any]] | None = None,
    ) -> Hashable:
        if len(prompts) != len(request_ids):
            raise ValueError(f"submit got {len(prompts)} prompts but {len(request_ids)} request_ids")
        index = self.pick()
        if index is None:
            raise NoCapacity(
                f"all {len(self._handles)} rollout workers have {self.max_inflight} calls in flight "
                "(rollout.max_inflight_per_worker): wait for one with on_done, or check idle_capacity() "
                "before submitting"
            )
        work = Work(index, [list(p) for p in prompts], n, dict(sampling), list(request_ids), time.time())
        # rows: the data rows, for multi-turn episodes (the worker's environment starts from them).
        extra = () if rows is None else (list(rows),)
        fut = self._call(self._handles[index], "generate", work.prompts, n, work.sampling, work.request_ids, *extra)
        self._inflight[index][fut] = work
        self._where[fut] = index
        self._last_pick[index] = next(self._pick_seq)
        return fut

    def on_done(self, fut: Hashable) -> Work | None:
        """Forget a finished call; returns its Work (None if unknown, e.g. handed back by remove)."""
        index = self._where.pop(fut, None)
        if index is None:
            return self._finished_orphans.pop(fut, None)
        return self._inflight[index].pop(fut)

    def finish(self, fut: Hashable, get: Callable[[Hashable], Any]) -> Finished:
        """Claim a finished call and read its result with ``get``.

        If reading raises one of ``dead_errors`` the call is lost: its Work comes back (to submit
        again) and, the first time a dead worker shows, ``dead_worker`` names it so the caller of
        the book removes it. Any other error is raised (the call is forgotten either way).
        """
        work = self.on_done(fut)
        try:
            return Finished(work, completions=get(fut))
        except self.dead_errors as e:
            index = work.worker_index if work is not None else None
            return Finished(work, dead_worker=index if index in self._handles else None, error=e)

    def overdue(self, timeout_s: float, now: float | None = None) -> list[int]:
        """Workers holding a generate call submitted more than ``timeout_s`` ago (hung engines)."""
        now = time.time() if now is None else now
        return sorted({i for i, calls in self._inflight.items()
                       if any(now - w.submitted_at > timeout_s for w in calls.values())})

    def next_deadline(self, timeout_s: float) -> float | None:
        """When the oldest call in flight becomes overdue (time.time() clock); None with none."""
        times = [w.submitted_at for calls in self._inflight.values() for w in calls.values()]
        return min(times) + timeout_s if times else None

    def work_of(self, fut: Hashable) -> Work | None:
        index = self._where.get(fut)
        if index is None:
            return self._finished_orphans.get(fut)
        return self._inflight[index][fut]

    # -- weights --------------------------------------------------------------------

    def weight_group_layout(self) -> tuple[int, dict[int, int]]:
        """(world size, {worker index: its first rank}); the learner is rank 0."""
        offsets, rank = {}, 1
        for i in self.indices():
            offsets[i] = rank
            rank += self.ranks_per_worker
        return rank, offsets

    def init_weight_group(self, host: str, port: int, backend: str) -> list[Hashable]:
        world_size, offsets = self.weight_group_layout()
        futs = [
            self._call(self._handles[i], "init_weight_group", host, port, off, world_size, backend)
            for i, off in offsets.items()
        ]
        self._group_members = tuple(offsets)
        return futs

    def receive_weights(self, plan: WeightPlan) -> list[Hashable]:
        if self._group_members is None:
            raise RuntimeError("receive_weights before init_weight_group: build the weight group first")
        if self._group_members != tuple(self.indices()):
            raise RuntimeError(
                f"the fleet changed since init_weight_group (was workers {list(self._group_members)}, now "
                f"{self.indices()}): call init_weight_group again (with a fresh port) before syncing weights"
            )
        return [self._call(self._handles[i], "receive_weights", plan) for i in self.indices()]


class RolloutFleet:
    """``RolloutWorker`` Ray actors, created from one ``RolloutConfig``."""

    def __init__(self, cfg: RolloutConfig, model_path: str, name_prefix: str = "", lora_rank: int | None = None):
        """``lora_rank``: learner.lora.r when the learner trains a LoRA adapter (the engines of
        rollout.lora_sync: adapter are built for it); None for full fine-tuning."""
        import ray

        self.cfg = cfg
        self.model_path = model_path
        self.lora_rank = lora_rank
        self.name_prefix = name_prefix
        # Decide from the cluster, not this process: the driver often runs on a CPU-only head.
        self.device = resolve_device(cfg, ray.cluster_resources().get("GPU", 0) > 0)
        pp = int(cfg.engine_kwargs.get("pipeline_parallel_size", 1))
        self.book = FleetBook(
            cfg.max_inflight_per_worker,
            call=lambda handle, method, *args: getattr(handle, method).remote(*args),
            ranks_per_worker=cfg.tensor_parallel_size * pp,
            dead_errors=(ray.exceptions.RayActorError, EngineDead),
        )
        self._nodes: dict[int, str | None] = {}  # worker index -> its Ray node id, from its ping
        for _ in range(cfg.num_workers):
            self.add_worker()

    def add_worker(self) -> int:
        """Start one more worker (initial weights, version 0): re-init the weight group and push
        the current weights to it before relying on its samples."""
        import ray

        index = self.book.next_index()
        worker_cfg = self.cfg.model_copy(update={"device": self.device})
        from fleetrl.rollout.worker import RolloutWorker

        handle = (
            ray.remote(RolloutWorker)
            .options(
                name=f"{self.name_prefix}rollout-{index}",
                num_cpus=self.cfg.num_cpus_per_worker,
                num_gpus=gpus_per_worker(self.cfg, self.device),
                resources=dict(self.cfg.resources) or None,
                max_restarts=0,
                runtime_env={"env_vars": {**quiet_env(), **worker_env(self.cfg, self.device)}},
            )
            .remote(worker_cfg, self.model_path, index, self.lora_rank)
        )
        return self.book.add(handle, index)

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Block until every worker's engine has started and warmed up; their ping() infos.

        Deadline ``timeout_s`` (default rollout.ready_timeout_s): a TimeoutError names the workers
        that did not answer, what each asks for and what the cluster has free.
        """
        import ray

        timeout_s = self.cfg.ready_timeout_s if timeout_s is None else timeout_s
        pings = {self.book.handle(i).ping.remote(): i for i in self.book.indices()}
        _, late = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        if late:
            ask = {"CPU": self.cfg.num_cpus_per_worker, "GPU": gpus_per_worker(self.cfg, self.device),
                   **self.cfg.resources}
            raise TimeoutError(
                f"rollout worker(s) {sorted(pings[r] for r in late)} did not start within {timeout_s:.0f}s "
                f"(rollout.ready_timeout_s). Each asks for {ask}; the cluster has "
                f"{ray.cluster_resources()} in all, {ray.available_resources()} free. If they could not be "
                "placed: lower rollout.num_workers or the per-worker resources, or add nodes; if they are "
                "placed but slow: raise rollout.ready_timeout_s"
            )
        infos = ray.get(list(pings))
        self._nodes.update({index: info.get("node_id") for index, info in zip(pings.values(), infos)})
        return infos

    def node_of(self, index: int) -> str | None:
        """The Ray node id worker ``index`` runs on (None until its first ``wait_ready``)."""
        return self._nodes.get(index)

    def inflight_of(self, index: int) -> int:
        """Generate calls in flight on worker ``index``."""
        return self.book.inflight(index)

    def remove_hung_workers(self) -> list[tuple[int, list[Work]]]:
        """Remove (kill) every worker holding a generate call older than rollout.generate_timeout_s.

        Returns (index, its unfinished calls) per worker: the caller submits those again.
        """
        return [(i, self.remove_worker(i, wait=True, timeout_s=0))
                for i in self.book.overdue(self.cfg.generate_timeout_s)]

    def next_deadline(self) -> float | None:
        """When the oldest generate call in flight becomes overdue (time.time() clock)."""
        return self.book.next_deadline(self.cfg.generate_timeout_s)

    def remove_worker(self, index: int, wait: bool = False, timeout_s: float | None = None) -> list[Work]:
        """Stop worker ``index``. Returns the calls it did not finish, to be submitted again.

        ``wait``: its calls in flight may finish first, within ``timeout_s`` (default
        rollout.generate_timeout_s: an older call is hung anyway)."""
        import ray

        if timeout_s is None:
            timeout_s = self.cfg.generate_timeout_s

        def wait_fn(futs: list, timeout: float | None) -> list:
            ready, _ = ray.wait(futs, num_returns=len(futs), timeout=timeout)
            return ready

        handle, unfinished = self.book.remove(index, wait=wait, timeout_s=timeout_s, wait_fn=wait_fn)
        self._nodes.pop(index, None)
        ray.kill(handle)
        return unfinished

    def remove_dead_workers(self, timeout_s: float = 60.0) -> list[int]:
        """Ping every worker; remove those whose actor has died. Returns their indices.

        A worker that is merely slow (its ping waits behind queued calls) counts as alive.
        """
        import ray

        pings = {self.book.handle(i).ping.remote(): i for i in self.book.indices()}
        answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)  # one deadline for all
        dead = []
        for ref in answered:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, EngineDead):
                dead.append(pings[ref])
        for index in dead:
            self.remove_worker(index, wait=True, timeout_s=0)
        return dead

    # -- generation -----------------------------------------------------------------

    @property
    def num_workers(self) -> int:
        return len(self.book.indices())

    def submit(self, prompts: Sequence[Sequence[int]], n: int, sampling: dict[str, Any],
               request_ids: Sequence[Any], rows: Sequence[dict[str, Any]] | None = None):
        """Queue one generate call on the least busy worker; an ObjectRef of list[Completion]."""
        return self.book.submit(prompts, n, sampling, request_ids, rows)

    def on_done(self, ref) -> Work | None:
        return self.book.on_done(ref)

    def finish(self, ref) -> Finished:
        """Collect a finished generate call (``ref`` came back from ray.wait).

        ``.completions`` when it succeeded. ``.lost`` when its worker died: that worker is out of
        the fleet now (``.dead_worker`` the first time), and the caller submits the prompts again
        (to the others; with ``num_workers == 0`` it must add workers first).
        """
        import ray

        finished = self.book.finish(ref, ray.get)
        if finished.dead_worker is not None:
            self.remove_worker(finished.dead_worker, wait=True, timeout_s=0)
        return finished

    def work_of(self, ref) -> Work | None:
        """The generate call behind ``ref`` (None if the fleet does not know it)."""
        return self.book.work_of(ref)

    def indices(self) -> list[int]:
        """Indices of the workers in the fleet, in rank order."""
        return self.book.indices()

    def idle_capacity(self) -> int:
        return self.book.idle_capacity()

    def inflight(self) -> int:
        return self.book.inflight()

    # -- weights --------------------------------------------------------------------

    def weight_group_world_size(self) -> int:
        return self.book.weight_group_layout()[0]

    def init_weight_group(self, host: str, port: int, backend: str) -> list:
        """Refs of every worker joining the side group; the learner joins as rank 0 meanwhile."""
        return self.book.init_weight_group(host, port, backend)

    def receive_weights(self, plan: WeightPlan) -> list:
        """Refs of every worker receiving ``plan``; the learner broadcasts its buckets meanwhile."""
        return self.book.receive_weights(plan)

    def versions(self, timeout_s: float | None = None) -> dict[int, int]:
        """Weight version of each worker (waits behind calls already queued on it, so by default up
        to rollout.generate_timeout_s)."""
        import ray

        idx = self.book.indices()
        timeout_s = self.cfg.generate_timeout_s if timeout_s is None else timeout_s
        got = ray.get([self.book.handle(i).get_weight_version.remote() for i in idx], timeout=timeout_s)
        return dict(zip(idx, got))

    def shutdown(self) -> None:
        import ray

        # Best effort, a few seconds at most: workers remove their adapter files (rollout.lora_sync:
        # adapter); what a killed worker leaves is swept by the next one started on that machine.
        adapters = self.lora_rank is not None and self.cfg.lora_sync == "adapter"
        closing = [self.book.handle(i).close.remote() for i in self.book.indices()] if adapters else []
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=5)
        for i in self.book.indices():
            handle, _ = self.book.remove(i, wait=True, timeout_s=0, wait_fn=lambda futs, t: [])
            ray.kill(handle)
