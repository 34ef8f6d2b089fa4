"""FleetBook: load balancing, capacity, removal, calls lost with a dead worker, weight-group layout,
without Ray."""

from __future__ import annotations

import itertools

import pytest
import torch

from fleetrl.core.weight_wire import plan_buckets
from fleetrl.rollout.config import RolloutConfig, SamplingConfig, gpus_per_worker, resolve_device, worker_env
from fleetrl.rollout.fleet import FleetBook, NoCapacity, WorkerBusy


class FakeCalls:
    """Records calls; each returns a distinct hashable future."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._ids = itertools.count()

    def __call__(self, handle, method, *args):
        fut = ("fut", next(self._ids))
        self.calls.append((handle, method, args, fut))
        return fut


def make_book(num_workers=3, max_inflight=2, ranks_per_worker=1):
    calls = FakeCalls()
    book = FleetBook(max_inflight, calls, ranks_per_worker=ranks_per_worker)
    for i in range(num_workers):
        assert book.add(f"w{i}") == i
    return book, calls


def submit(book, rid):
    return book.submit([[1, 2, 3]], 2, {"temperature": 1.0}, [rid])


def worker_of(calls, fut):
    return next(h for h, _, _, f in calls.calls if f == fut)


def test_spreads_calls_over_least_loaded_workers():
    book, calls = make_book(3, max_inflight=2)
    futs = [submit(book, i) for i in range(3)]
    assert [worker_of(calls, f) for f in futs] == ["w0", "w1", "w2"]
    assert [book.inflight(i) for i in range(3)] == [1, 1, 1]
    # A worker that finishes first is the least loaded one and gets the next call.
    book.on_done(futs[1])
    assert worker_of(calls, submit(book, 3)) == "w1"
    # Then every worker has one in flight: the next goes to the one picked longest ago.
    book.on_done(futs[0])
    book.on_done(futs[2])
    assert worker_of(calls, submit(book, 4)) == "w0"


def test_generate_call_carries_the_request():
    book, calls = make_book(1)
    fut = book.submit([[5, 6], [7]], 4, {"max_tokens": 3}, ["a", "b"])
    handle, method, args, f = calls.calls[0]
    assert (handle, method, f) == ("w0", "generate", fut)
    assert args == ([[5, 6], [7]], 4, {"max_tokens": 3}, ["a", "b"])
    work = book.on_done(fut)
    assert work.worker_index == 0 and work.request_ids == ["a", "b"] and work.n == 4
    assert book.on_done(fut) is None  # already claimed
    with pytest.raises(ValueError, match="request_ids"):
        book.submit([[1]], 1, {}, [])


def test_capacity_is_bounded_per_worker():
    book, calls = make_book(2, max_inflight=2)
    assert book.idle_capacity() == 4
    futs = [submit(book, i) for i in range(4)]
    assert book.idle_capacity() == 0
    assert [book.inflight(i) for i in range(2)] == [2, 2]
    with pytest.raises(NoCapacity, match="max_inflight_per_worker"):
        submit(book, 99)
    assert len(calls.calls) == 4  # the refused call reached no worker
    book.on_done(futs[2])
    assert book.idle_capacity() == 1
    submit(book, 5)
    assert book.idle_capacity() == 0


def test_remove_idle_worker_and_indices_are_not_reused():
    book, _ = make_book(2)
    handle, unfinished = book.remove(0)
    assert handle == "w0" and unfinished == []
    assert book.indices() == [1]
    assert book.add("w-new") == 2
    assert book.idle_capacity() == 4
    with pytest.raises(KeyError, match="no rollout worker with index 0"):
        book.remove(0)


def test_remove_busy_worker_is_refused_without_wait():
    book, _ = make_book(2)
    submit(book, "r0")  # -> worker 0
    with pytest.raises(WorkerBusy, match=r"remove_worker\(0, wait=True\)"):
        book.remove(0)
    # Nothing changed: the worker still takes work.
    assert book.indices() == [0, 1]
    assert book.idle_capacity() == 3


def test_remove_with_wait_hands_back_unfinished_work():
    book, calls = make_book(2, max_inflight=2)
    futs = [submit(book, f"r{i}") for i in range(4)]  # w0: r0, r2; w1: r1, r3
    on_w0 = [f for f in futs if worker_of(calls, f) == "w0"]
    seen = {}

    def wait_fn(pending, timeout):
        seen["pending"], seen["timeout"] = sorted(pending), timeout
        # While waiting, the worker is draining: no capacity is offered on it.
        seen["capacity"] = book.idle_capacity()
        return [on_w0[0]]  # the first finished, the second did not

    handle, unfinished = book.remove(0, wait=True, timeout_s=5.0, wait_fn=wait_fn)
    assert handle == "w0"
    assert seen == {"pending": sorted(on_w0), "timeout": 5.0, "capacity": 0}
    assert [w.request_ids for w in unfinished] == [["r2"]]
    assert unfinished[0].prompts == [[1, 2, 3]] and unfinished[0].n == 2
    # The finished call is still claimable; the handed-back one is forgotten.
    assert book.on_done(on_w0[0]).request_ids == ["r0"]
    assert book.on_done(on_w0[1]) is None
    assert book.indices() == [1] and book.inflight() == 2


class WorkerDied(RuntimeError):
    """Stands in for ray.exceptions.RayActorError."""


def test_finish_returns_completions_or_reports_the_dead_worker_once():
    book, calls = make_book(2, max_inflight=3)
    book.dead_errors = (WorkerDied,)
    ok, lost_a, lost_b = submit(book, "p0"), submit(book, "p1"), submit(book, "p2")
    assert [worker_of(calls, f) for f in (ok, lost_a, lost_b)] == ["w0", "w1", "w0"]
    dead = {lost_a}

    def get(fut):
        if fut in dead:
            raise WorkerDied("actor w1 died")
        return [f"completion of {fut}"]

    done = book.finish(ok, get)
    assert not done.lost and done.completions == [f"completion of {ok}"] and done.work.request_ids == ["p0"]
    assert book.inflight(0) == 1

    # The first call lost with worker 1 names it (the fleet then removes it) and hands its work back.
    first = book.finish(lost_a, get)
    assert first.lost and first.completions is None and isinstance(first.error, WorkerDied)
    assert first.dead_worker == 1 and first.work.request_ids == ["p1"] and first.work.worker_index == 1
    # Once the worker is out of the fleet, its other lost calls are lost too but name no one again.
    late = submit(book, "p3")
    assert worker_of(calls, late) == "w1"
    dead.add(late)
    book.remove(1, wait=True, timeout_s=0, wait_fn=lambda futs, t: list(futs))  # what the fleet does
    again = book.finish(late, get)
    assert again.lost and again.dead_worker is None and again.work.request_ids == ["p3"]
    # A call the book no longer knows (handed back by remove) is still resolved, without its Work.
    assert book.finish(("fut", 999), get).work is None


def test_finish_raises_errors_that_are_not_a_dead_worker():
    book, _ = make_book(1)
    book.dead_errors = (WorkerDied,)
    fut = submit(book, "p0")

    def get(_):
        raise ValueError("bad sampling params")

    with pytest.raises(ValueError, match="bad sampling"):
        book.finish(fut, get)
    assert book.inflight() == 0  # forgotten either way: it will never be claimed twice


def test_weight_group_layout_and_fanout():
    book, calls = make_book(3, ranks_per_worker=2)
    book.remove(1)
    assert book.weight_group_layout() == (5, {0: 1, 2: 3})
    plan = plan_buckets([("w", (2, 2), torch.float32)], version=1)
    with pytest.raises(RuntimeError, match="init_weight_group"):
        book.receive_weights(plan)
    futs = book.init_weight_group("127.0.0.1", 1234, "gloo")
    assert [(h, m, a) for h, m, a, f in calls.calls if f in futs] == [
        ("w0", "init_weight_group", ("127.0.0.1", 1234, 1, 5, "gloo")),
        ("w2", "init_weight_group", ("127.0.0.1", 1234, 3, 5, "gloo")),
    ]
    futs = book.receive_weights(plan)
    assert [(h, m) for h, m, a, f in calls.calls if f in futs] == [
        ("w0", "receive_weights"), ("w2", "receive_weights")]
    # Weight calls are not generate calls: they take no generate capacity.
    assert book.idle_capacity() == 4
    book.add("w3")
    with pytest.raises(RuntimeError, match="call init_weight_group again"):
        book.receive_weights(plan)


def test_config_defaults_and_resolution():
    cfg = RolloutConfig()
    assert cfg.max_model_len == 4096 and cfg.gpu_memory_utilization == 0.85 and not cfg.enforce_eager
    assert cfg.sampling == SamplingConfig() and cfg.sampling.top_k == -1 and cfg.sampling.max_tokens == 1024
    assert resolve_device(cfg, gpu_available=True) == "cuda"
    assert resolve_device(cfg, gpu_available=False) == "cpu"
    with pytest.raises(RuntimeError, match="rollout.device"):
        resolve_device(RolloutConfig(device="cuda"), gpu_available=False)
    tp2 = RolloutConfig(tensor_parallel_size=2)
    assert gpus_per_worker(tp2, "cuda") == 2
    assert gpus_per_worker(tp2, "cpu") == 0
    assert gpus_per_worker(tp2.model_copy(update={"distributed_executor_backend": "ray"}), "cuda") == 0
    assert gpus_per_worker(RolloutConfig(num_gpus_per_worker=0.5), "cuda") == 0.5
    # One CPU engine: the model runs in the engine core process (no third process to start).
    assert worker_env(RolloutConfig(cpu_kvcache_space_gb=1), "cpu") == {
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in worker_env(tp2, "cpu")  # vLLM's mp executor binds cores
    mine = RolloutConfig(env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert worker_env(mine, "cpu")["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # the user's choice stands
    assert worker_env(RolloutConfig(), "cuda") == {}


def test_config_rejects_unknown_and_shadowing_keys():
    with pytest.raises(ValueError, match="extra"):
        RolloutConfig(num_worker=2)
    with pytest.raises(ValueError, match="rollout.max_model_len|fleetrl sets itself"):
        RolloutConfig(engine_kwargs={"max_model_len": 10})
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-2)


def test_overdue_workers_and_the_next_deadline():
    book, _ = make_book(num_workers=3, max_inflight=2)
    assert book.next_deadline(10.0) is None and book.overdue(10.0) == []
    f0 = submit(book, "a")  # worker 0
    f1 = submit(book, "b")  # worker 1
    book.work_of(f0).submitted_at = 100.0
    book.work_of(f1).submitted_at = 105.0
    assert book.next_deadline(10.0) == 110.0
    assert book.overdue(10.0, now=109.0) == []
    assert book.overdue(10.0, now=111.0) == [0]  # worker 0's call is past its deadline: hung
    assert book.overdue(10.0, now=116.0) == [0, 1]
    book.on_done(f0)
    assert book.next_deadline(10.0) == 115.0
