"""Waits with deadlines: each hang is fed and must end in a clear error that names who is late."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fleetrl.data.rows import DataError, PromptRow, PromptStream
from fleetrl.online.collect import GroupCollector, RolloutStats
from fleetrl.run.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


class WordTokenizer:
    """One token per word; no chat template."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def test_prompts_that_never_fit_end_with_an_error_not_a_loop():
    cfg = load_config(EXAMPLE, ["rl.max_prompt_tokens=2"])
    rows = [PromptRow(prompt="one two three", extra={}, source=f"row {i}") for i in range(5)]
    collector = GroupCollector(cfg, fleet=None, reward_actors=[], stream=PromptStream(rows), tokenizer=WordTokenizer())
    start = time.monotonic()
    with pytest.raises(DataError, match=r"none of the 5 prompts fits rl.max_prompt_tokens=2"):
        collector._next_prompts(1, RolloutStats())
    assert time.monotonic() - start < 5


def test_a_worker_that_cannot_be_placed_fails_the_start_with_what_is_missing(ray_local):
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.fleet import RolloutFleet

    fleet = RolloutFleet(RolloutConfig(num_workers=1, num_cpus_per_worker=1000, device="cpu"), "unused-model",
                         name_prefix="deadline-test/")
    try:
        with pytest.raises(TimeoutError, match=r"rollout worker\(s\) \[0\] did not start within 2s.*'CPU': 1000"):
            fleet.wait_ready(timeout_s=2)
    finally:
        fleet.shutdown()


def test_a_stalled_weight_sync_names_the_peer_that_did_not_answer(ray_local):
    import ray

    from fleetrl.online.weights import WeightSync
    from fleetrl.rollout.config import RolloutConfig

    @ray.remote
    def answer():
        return None

    @ray.remote
    def stall():
        time.sleep(3600)

    # Start the task workers first: on a loaded machine starting them takes longer than the deadline below,
    # and then the peers that did answer would be named too.
    ray.get([answer.remote() for _ in range(3)], timeout=120)

    class Learner:
        def side_group_address(self):
            return "127.0.0.1", 0

        def init_weight_sync(self, host, port, world, backend):
            return [answer.remote()]

    class Fleet:
        cfg = RolloutConfig(weight_sync_timeout_s=3.0)

        def weight_group_world_size(self):
            return 3

        def indices(self):
            return [0, 4]

        def init_weight_group(self, host, port, backend):
            self.stalled = stall.remote()
            return [answer.remote(), self.stalled]

    fleet = Fleet()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"joining the weight-sync group.*no answer from rollout worker 4\."):
        WeightSync(Learner(), fleet, backend="gloo")
    assert time.monotonic() - start < 30
    ray.cancel(fleet.stalled, force=True)
