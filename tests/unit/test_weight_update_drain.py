"""rollout.weight_update: drain over a stand-in engine that orders events as vLLM documents them.

vLLM's ``pause_generation(mode="wait")`` returns once the engine has finished its requests, and notes
that their final outputs may still be on their way to the caller. A drained request must still
report that all its tokens came from the old weights (``weight_version == last_weight_version``),
new requests must wait for the new weights, and a request that never ends must not hold the update
forever. The real engine's drain is in tests/e2e/test_rollout_worker.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fleetrl.rollout.worker import RolloutWorker


class LaggingEngine:
    """Each request yields a few partial outputs, then finishes in the engine; its final output
    reaches the caller ``lag_s`` later (vLLM's output processing runs in tasks of its own)."""

    def __init__(self, lag_s: float = 0.2, steps: int = 3, forever: bool = False):
        self.lag_s, self.steps, self.forever = lag_s, steps, forever
        self.running = 0
        self.paused = False
        self.loaded: list[int] = []
        self.errored = False
        self.resets: list[int] = []

    @staticmethod
    def _out(n: int):
        c = SimpleNamespace(index=0, token_ids=list(range(n)), finish_reason="length",
                            logprobs=[{t: SimpleNamespace(logprob=-1.0)} for t in range(n)])
        return SimpleNamespace(outputs=[c])

    async def generate(self, prompt, params, request_id, lora_request=None):
        while self.paused:  # new requests are not scheduled until resume
            await asyncio.sleep(0.005)
        self.running += 1
        try:
            for i in range(1, self.steps + 1):
                await asyncio.sleep(0.01)
                yield self._out(i)
            while self.forever:
                await asyncio.sleep(0.01)
        finally:
            self.running -= 1
        await asyncio.sleep(self.lag_s)
        yield self._out(self.steps)

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        self.paused = True
        while mode == "wait" and self.running:
            await asyncio.sleep(0.001)

    # AsyncLLM.pause_generation is renderer.clear_mm_cache_async + engine_core.pause_scheduler_async + a
    # 20 ms sleep for outputs in flight; an idle worker calls the first two itself.
    engine_core = renderer = property(lambda self: self)
    quick_pauses = 0

    async def clear_mm_cache_async(self) -> None:
        pass

    async def pause_scheduler_async(self, mode: str, clear_cache: bool) -> None:
        assert not self.running and mode == "keep" or mode == "wait", "paused without the wait while running"
        self.quick_pauses += 1
        await self.pause_generation(mode, clear_cache)

    async def collective_rpc(self, name, args):
        self.loaded.append(int(args[0]["version"]))
        return [{}]

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        assert self.paused, "the prefix cache is reset before generation resumes"
        self.resets.append(self.loaded[-1])  # the version loaded when the cache was dropped
        return True

    async def resume_generation(self) -> None:
        self.paused = False


def _worker(engine, **cfg) -> RolloutWorker:
    worker = RolloutWorker.__new__(RolloutWorker)
    worker._init_state({"weight_update": "drain", **cfg}, "stand-in", 0, None)
    worker.engine = engine
    return worker


def test_a_drained_request_reports_only_the_old_weights_and_new_ones_wait_for_the_new():
    async def scenario():
        engine = LaggingEngine()
        worker = _worker(engine)
        drained = asyncio.create_task(worker._sample("a", [1, 2], None))
        while not engine.running:
            await asyncio.sleep(0.001)
        update = asyncio.create_task(worker.receive_weights({"version": 1}))
        await asyncio.sleep(0.005)
        later = asyncio.create_task(worker._sample("b", [1, 2], None))  # arrives during the drain
        report = await update
        (a,), (b,) = await drained, await later
        return report, a, b, engine.loaded

    report, a, b, loaded = asyncio.run(scenario())
    assert loaded == [1] and report["weight_version"] == 1
    assert (a.weight_version, a.last_weight_version) == (0, 0)  # every token under the old weights
    assert (b.weight_version, b.last_weight_version) == (1, 1)  # waited for the new ones


def test_a_request_that_never_ends_fails_the_drain_by_its_deadline_and_names_it():
    async def scenario():
        engine = LaggingEngine(forever=True)
        worker = _worker(engine, weight_sync_timeout_s=0.3)
        stuck = asyncio.create_task(worker._sample("a", [1], None))
        while not engine.running:
            await asyncio.sleep(0.001)
        with pytest.raises(TimeoutError) as e:
            await asyncio.wait_for(worker.receive_weights({"version": 1}), timeout=10)  # the test's own bound
        stuck.cancel()
        # The old weights stay, and new requests are admitted again.
        assert worker.weight_version == 0 and engine.loaded == [] and worker._admit.is_set()
        return str(e.value)

    msg = asyncio.run(scenario())
    assert "1 request(s) in flight did not finish within rollout.weight_sync_timeout_s=0.3s" in msg
    assert "weight version 1 (rollout.weight_update: drain) was not loaded" in msg


def test_the_prefix_cache_is_reset_after_every_weight_version_is_loaded():
    async def scenario():
        engine = LaggingEngine()
        worker = _worker(engine, weight_update="in_flight")
        for version in (1, 2, 2):  # a version sent again (a failed check) is reset again
            await worker.receive_weights({"version": version})
        return engine, worker

    engine, worker = asyncio.run(scenario())
    assert engine.loaded == [1, 2, 2]
    assert engine.resets == [1, 2, 2]  # after each load, while the engine was still paused
    assert engine.quick_pauses == 3  # an idle worker pauses without vLLM's wait for outputs in flight
    assert worker.prefix_cache_resets == {1: 1, 2: 2}


class HalfwayEngine(LaggingEngine):
    """Its weight reload breaks after it began (vLLM's rpc error carries the worker's message)."""

    async def collective_rpc(self, name, args):
        from fleetrl.rollout.weight_receiver import PARTIAL_RELOAD

        raise RuntimeError(f"Worker failed: {PARTIAL_RELOAD} at weight version {args[0]['version']}: "
                           "RuntimeError: the broadcast broke")


def test_a_reload_that_breaks_halfway_takes_the_worker_out_of_service():
    from fleetrl.rollout.fleet import EngineDead

    async def scenario():
        engine = HalfwayEngine()
        worker = _worker(engine, weight_update="in_flight")
        with pytest.raises(EngineDead) as first:
            await worker.receive_weights({"version": 1})
        # The engine stays paused (neither version is whole in it), and every later call is refused.
        assert engine.paused
        with pytest.raises(EngineDead) as later:
            await worker.generate([[1, 2]], 1, {}, ["r"])
        return str(first.value), str(later.value)

    first, later = asyncio.run(scenario())
    assert "rollout worker 0: its weight reload of version 1 failed halfway" in first
    assert "the fleet replaces this worker" in first
    assert "failed halfway" in later


class DyingEngine(LaggingEngine):
    """Its engine process dies while a request runs (vLLM raises EngineDeadError to the caller)."""

    async def generate(self, prompt, params, request_id, lora_request=None):
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError("the engine core process exited")
        yield  # an async generator, as vLLM's


def test_a_probe_on_a_dead_engine_reports_a_dead_worker_not_an_error():
    # The weight check's log-prob probe runs while the fleet generates: an engine that dies meanwhile
    # must read as a dead worker (replaced), not as an error that ends the run.
    from fleetrl.rollout.fleet import EngineDead

    worker = _worker(DyingEngine(), weight_update="in_flight")
    with pytest.raises(EngineDead, match="rollout worker 0: its vLLM engine died .*the fleet replaces this worker"):
        asyncio.run(worker.probe([1, 2, 3]))
