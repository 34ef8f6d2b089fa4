"""A real vLLM (CPU) rollout worker, in this process (no Ray): generation, scoring, weight sync."""

from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.e2e

CFG = {"device": "cpu", "max_model_len": 256, "enforce_eager": True, "dtype": "float32",
       "cpu_kvcache_space_gb": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_in_thread(fn, *args):
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised by _join in the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _join(t: threading.Thread, box: dict, timeout: float = 120.0):
    t.join(timeout)
    assert not t.is_alive(), "the worker side did not finish in time"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _hf_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    picked = lp.gather(-1, targets[:, None])[:, 0]
    return picked[len(prompt_ids) - 1 :].tolist()


@pytest.fixture(scope="module")
def models(tiny_policy, tiny_policy_seed1):
    """The model the worker starts with, and one whose weights it receives."""
    return tiny_policy, tiny_policy_seed1


@pytest.fixture(scope="module")
def worker(models):
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.worker import InProcessWorker

    env_keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")  # what worker_env sets
    env_before = {k: os.environ.get(k) for k in env_keys}
    t0 = time.perf_counter()
    w = InProcessWorker(RolloutConfig(**CFG), str(models[0]), worker_index=3)
    # The engine ran the model in its own process (no third one), and the worker's environment
    # did not leak into this process (a vllm.LLM built here later would run with it).
    assert w.worker.engine.vllm_config.parallel_config.distributed_executor_backend == "uni"
    assert {k: os.environ.get(k) for k in env_keys} == env_before
    print(f"\nworker start {time.perf_counter() - t0:.1f}s (engine {w.engine_start_s:.1f}s, "
          f"warm-up {w.warmup_s:.1f}s)")
    assert w.weight_version == 0
    assert w.ping()["device"] == "cpu" and w.ping()["num_gpus"] == 0
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models[0])


def test_generate_samples_with_logprobs(worker, tokenizer):
    prompts = [tokenizer.encode("the cat sat on"), tokenizer.encode("1 + 2 =")]
    t0 = time.perf_counter()
    out = worker.generate(prompts, n=3, sampling={"temperature": 1.0, "max_tokens": 24}, request_ids=["a", 7])
    dt = time.perf_counter() - t0
    print(f"generate 2x3x<=24 tokens: {dt:.2f}s, {sum(len(c.token_ids) for c in out) / dt:.0f} tokens/s")

    assert [(c.request_id, c.sample_index) for c in out] == [
        ("a", 0), ("a", 1), ("a", 2), (7, 0), (7, 1), (7, 2)]
    for c in out:
        assert c.prompt_token_ids == prompts[0 if c.request_id == "a" else 1]
        assert 1 <= len(c.token_ids) <= 24
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(x) and x <= 0.0 for x in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == 24
        assert c.weight_version == worker.weight_version
        assert c.worker_index == 3
    # Three samples of a random model over a ~500-token vocabulary are not all the same.
    assert len({tuple(c.token_ids) for c in out}) > 1

    # At temperature 1 the sampling distribution is the model's: scoring the sampled
    # completion afterwards gives back the logprobs the sampler reported.
    for c in out[:2] + out[3:4]:
        scored = worker.score(c.prompt_token_ids, c.token_ids)
        assert max(abs(a - b) for a, b in zip(scored, c.logprobs)) < 1e-3


def test_generate_rejects_mismatched_request_ids(worker):
    with pytest.raises(ValueError, match="request_ids"):
        worker.generate([[5, 6]], n=1, sampling={}, request_ids=[])
    with pytest.raises(ValueError, match="sets itself"):
        worker.generate([[5, 6]], n=1, sampling={"logprobs": 5}, request_ids=[0])


def test_weight_sync_matches_transformers(worker, models, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from fleetrl.core.weight_wire import broadcast, init_side_group, pack_bucket, plan_buckets

    model_b = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32).eval()
    prompt = tokenizer.encode("the quick brown fox")
    completion = tokenizer.encode(" jumps over the lazy dog and runs away")
    expected = _hf_logprobs(model_b, prompt, completion)
    before = worker.score(prompt, completion)
    version_before = worker.weight_version

    # The test process plays the learner: rank 0 of a gloo side group on loopback.
    port = _free_port()
    t, box = _run_in_thread(worker.init_weight_group, "127.0.0.1", port, 1, 2, "gloo")
    group = init_side_group("127.0.0.1", port, 0, 2, "gloo")
    assert _join(t, box) == [1]

    params = dict(model_b.named_parameters())
    plan = plan_buckets(((n, p.shape, p.dtype) for n, p in params.items()),
                        version=version_before + 1, bucket_bytes=200_000)
    assert len(plan.buckets) >= 5
    t, box = _run_in_thread(worker.receive_weights, plan)
    t0 = time.perf_counter()
    for bucket in plan.buckets:
        broadcast(group, pack_bucket(bucket, params), src=0)
    stats = _join(t, box)
    print(f"\nsync {plan.num_bytes / 1e6:.2f} MB in {len(plan.buckets)} buckets: "
          f"{time.perf_counter() - t0:.3f}s (worker: {stats})")

    assert worker.weight_version == version_before + 1
    after = worker.score(prompt, completion)
    diff_b = max(abs(a - b) for a, b in zip(after, expected))
    diff_before = max(abs(a - b) for a, b in zip(before, expected))
    print(f"max |vLLM - HF(B)| after sync {diff_b:.2e}; before sync {diff_before:.2e}")
    assert diff_b < 1e-3
    assert diff_before > 1e-2

    # New samples carry the new version, and their logprobs are those of the TEMPERED
    # distribution they were sampled from (logprobs_mode="processed_logprobs").
    out = worker.generate([prompt], n=2, sampling={"temperature": 0.7, "max_tokens": 12}, request_ids=["t"])
    for c in out:
        assert c.weight_version == version_before + 1
        ref = _hf_logprobs(model_b, prompt, c.token_ids, temperature=0.7)
        raw = _hf_logprobs(model_b, prompt, c.token_ids, temperature=1.0)
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-3
        assert max(abs(a - b) for a, b in zip(c.logprobs, raw)) > 1e-3

    # An update IN FLIGHT (partial rollout): a long generation runs under B while model A's weights
    # arrive; the engine pauses between two steps, loads, and goes on. The tokens before the switch
    # are B's samples, those after it A's, and the completion records both versions.
    model_a = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()
    params_a = dict(model_a.named_parameters())
    plan_a = plan_buckets(((n, p.shape, p.dtype) for n, p in params_a.items()), version=version_before + 2)
    long = worker.submit("generate", [prompt], 1, {"max_tokens": 200, "ignore_eos": True}, ["long"])
    deadline = time.monotonic() + 60
    while worker.ping()["requests_in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # some tokens under B first
    receipt = worker.submit("receive_weights", plan_a)
    for bucket in plan_a.buckets:
        broadcast(group, pack_bucket(bucket, params_a), src=0)
    assert receipt.result(timeout=120)["requests_in_flight"] == 1
    (c,) = long.result(timeout=300)
    assert (c.weight_version, c.last_weight_version) == (version_before + 1, version_before + 2)
    under_b = [abs(a - b) < 1e-3 for a, b in zip(c.logprobs, _hf_logprobs(model_b, prompt, c.token_ids))]
    under_a = [abs(a - b) < 1e-3 for a, b in zip(c.logprobs, _hf_logprobs(model_a, prompt, c.token_ids))]
    switch = under_b.index(False)
    assert 0 < switch < len(c.token_ids), "the update should land mid-generation"
    assert all(under_b[:switch]) and all(under_a[switch:]), (under_b, under_a)

    # rollout.weight_update: drain: the running request finishes under A; B's weights wait for it.
    worker.worker.cfg = worker.cfg.model_copy(update={"weight_update": "drain"})
    plan_b = plan_buckets(((n, p.shape, p.dtype) for n, p in params.items()), version=version_before + 3)
    long = worker.submit("generate", [prompt], 1, {"max_tokens": 120, "ignore_eos": True}, ["drained"])
    while worker.ping()["requests_in_flight"] == 0 and time.monotonic() < deadline + 60:
        time.sleep(0.01)
    receipt = worker.submit("receive_weights", plan_b)
    for bucket in plan_b.buckets:
        broadcast(group, pack_bucket(bucket, params), src=0)
    assert receipt.result(timeout=120)["weight_version"] == version_before + 3
    (c,) = long.result(timeout=300)
    assert c.weight_version == c.last_weight_version == version_before + 2
    assert max(abs(a - b) for a, b in zip(c.logprobs, _hf_logprobs(model_a, prompt, c.token_ids))) < 1e-3


def test_fleet_on_ray(ray_local, models):
    """The same worker as a Ray actor behind RolloutFleet: generate, weight sync, removal."""
    import torch
    from transformers import AutoModelForCausalLM

    from fleetrl.core.weight_wire import broadcast, init_side_group, pack_bucket, plan_buckets
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.fleet import RolloutFleet, WorkerBusy

    ray = ray_local
    fleet = RolloutFleet(RolloutConfig(**CFG, max_inflight_per_worker=2), str(models[0]), name_prefix="test-")
    try:
        (info,) = fleet.wait_ready(timeout_s=300)
        assert info["device"] == "cpu" and info["weight_version"] == 0
        refs = [fleet.submit([[5, 6, 7]], 2, {"max_tokens": 6}, [f"r{i}"]) for i in range(2)]
        assert fleet.idle_capacity() == 0
        for ref in refs:
            out = ray.get(ref)
            assert fleet.on_done(ref).request_ids == [out[0].request_id]
            assert [c.sample_index for c in out] == [0, 1]
            assert all(len(c.logprobs) == len(c.token_ids) for c in out)

        # Weight sync through the actor: this process is the learner (rank 0).
        model_b = AutoModelForCausalLM.from_pretrained(models[1], dtype=torch.float32)
        port = _free_port()
        joins = fleet.init_weight_group("127.0.0.1", port, "gloo")
        group = init_side_group("127.0.0.1", port, 0, fleet.weight_group_world_size(), "gloo")
        assert ray.get(joins, timeout=120) == [[1]]
        params = dict(model_b.named_parameters())
        plan = plan_buckets(((n, p.shape, p.dtype) for n, p in params.items()), version=5,
                            bucket_bytes=300_000)
        receipts = fleet.receive_weights(plan)
        for bucket in plan.buckets:
            broadcast(group, pack_bucket(bucket, params))
        assert [r["weight_version"] for r in ray.get(receipts, timeout=120)] == [5]
        assert fleet.versions(timeout_s=60) == {0: 5}
        prompt, completion = [5, 6, 7, 8], [9, 10, 11, 12]
        scored = ray.get(fleet.book.handle(0).score.remote(prompt, completion))
        assert max(abs(a - b) for a, b in zip(scored, _hf_logprobs(model_b, prompt, completion))) < 1e-3

        # A busy worker is not removed unless asked to wait; then nothing is lost.
        ref = fleet.submit([[5, 6, 7]], 1, {"max_tokens": 6}, ["last"])
        with pytest.raises(WorkerBusy):
            fleet.remove_worker(0)
        assert fleet.remove_worker(0, wait=True, timeout_s=120) == []
        assert fleet.num_workers == 0
        assert fleet.on_done(ref).request_ids == ["last"]
        assert ray.get(ref)[0].weight_version == 5
    finally:
        fleet.shutdown()
