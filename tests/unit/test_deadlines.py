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


# ---------------------------------------------------------------- every other wait, each fed its stall


class IdleFleet:
    """A fleet with nothing generating and no room for more (the collector only waits)."""

    num_workers = 1

    def idle_capacity(self):
        return 0

    def remove_hung_workers(self):
        return []

    def next_deadline(self):
        return None


@pytest.fixture(scope="module")
def stuck(ray_local):
    """An actor whose every call but ping() hangs (threaded, so ping still answers), and task helpers."""
    import ray

    @ray.remote(num_cpus=0, max_concurrency=8)
    class Stuck:
        def ping(self):
            return {}

        def generate(self, *args):
            time.sleep(3600)

        def score(self, *args):
            time.sleep(3600)

        def poll(self):
            time.sleep(3600)

        def describe(self):
            time.sleep(3600)

    @ray.remote(num_cpus=0)
    def stall():
        time.sleep(3600)

    @ray.remote(num_cpus=0)
    def fail():
        raise ValueError("rank 1 ran out of memory")

    @ray.remote(num_cpus=0)
    def answer():
        return None

    ray.get([answer.remote() for _ in range(3)], timeout=120)  # task workers up before the deadlines below
    actors = []

    def make():
        actors.append(Stuck.remote())
        ray.get(actors[-1].ping.remote(), timeout=120)
        return actors[-1]

    yield type("Stuck", (), {"make": staticmethod(make), "stall": stall, "fail": fail})
    for a in actors:
        ray.kill(a)


def test_pump_with_nothing_generating_times_out_naming_the_late_rank(stuck):
    # rl.max_staleness 0: nothing generates while the learner trains, so pump only waits on the learner.
    cfg = load_config(EXAMPLE, ["rl.max_staleness=0"])
    collector = GroupCollector(cfg, fleet=IdleFleet(), reward_actors=[], stream=None, tokenizer=None)
    stalled = stuck.stall.remote()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"train call did not finish within 2s \(learner.call_timeout_s\): "
                                           r"no answer from run/learner-rank-1\."):
        collector.pump([_done(), stalled], RolloutStats(), timeout_s=2,
                       names=["run/learner-rank-0", "run/learner-rank-1"])
    assert time.monotonic() - start < 30


def _done():
    import ray

    return ray.put(None)


def test_pump_fails_on_the_first_failed_rank_not_after_the_others(stuck):
    cfg = load_config(EXAMPLE)
    collector = GroupCollector(cfg, fleet=IdleFleet(), reward_actors=[], stream=None, tokenizer=None)
    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 ran out of memory"):
        collector.pump([stuck.stall.remote(), stuck.fail.remote()], RolloutStats(), timeout_s=600,
                       names=["learner-rank-0", "learner-rank-1"])
    assert time.monotonic() - start < 30


def test_a_hung_reward_actor_fails_collection_naming_it(stuck, monkeypatch):
    from fleetrl.online.batch import Group, Sample
    from fleetrl.reward.config import RewardConfig

    monkeypatch.setattr(RewardConfig, "call_deadline_s", lambda self: 1.0)
    cfg = load_config(EXAMPLE)
    actor = stuck.make()
    collector = GroupCollector(cfg, fleet=IdleFleet(), reward_actors=[actor], stream=None, tokenizer=None)
    row = PromptRow(prompt="p", extra={}, source="row 0")
    collector._score([Group(0, row, [Sample(0, "p", [1], [2], [0.0], "stop", 0, "c")])])
    collector._score([Group(1, row, [Sample(1, "p", [1], [2], [0.0], "stop", 0, "c")])])  # 1 call ahead of it
    assert sorted(collector._reward_deadline.values())[1] - sorted(collector._reward_deadline.values())[0] > 0.9
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reward actor 0 did not answer a score call within its deadline "
                                           r"\(1s per call.*reward.timeout_s"):
        collector.collect(1)
    assert time.monotonic() - start < 30


def test_evaluation_times_out_naming_the_reward_actor(stuck, monkeypatch):
    import ray

    from fleetrl.online.evaluate import HeldOutEval
    from fleetrl.reward.config import RewardConfig

    monkeypatch.setattr(RewardConfig, "call_deadline_s", lambda self: 1.0)
    cfg = load_config(EXAMPLE)

    class Done:
        lost = False
        completions = [type("C", (), {"request_id": "eval-0", "token_ids": [1, 2]})()]

    class Fleet:
        def idle_capacity(self):
            return 1

        def submit(self, *args, **kwargs):
            return ray.put(None)

        def finish(self, ref):
            return Done()

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1]}

        def decode(self, ids, skip_special_tokens=True):
            return "c"

    rows = [PromptRow(prompt="p", extra={}, source="row 0")]
    evaluator = HeldOutEval(cfg, Fleet(), [stuck.make()], rows, Tok(), reward_calls_ahead=lambda: 2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"evaluation: scoring the held-out completions: no answer within 3s "
                                           r"from reward actor 0\. every reward function has a deadline"):
        evaluator.run()  # 1 s per call, 2 calls of the collector ahead of it
    assert time.monotonic() - start < 30


def test_the_control_poll_times_out_naming_the_control_actor(stuck):
    from fleetrl.online.control import poll_control

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reading `fleetrl scale` / stop requests between steps: no answer "
                                           r"within 1s from the run's control actor \(orchestrator\)"):
        poll_control(stuck.make(), timeout_s=1)
    assert time.monotonic() - start < 30


def test_shrinking_the_fleet_does_not_wait_forever_on_a_hung_worker(stuck):
    from fleetrl.online.weights import resize_fleet
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.fleet import FleetBook, RolloutFleet

    fleet = RolloutFleet.__new__(RolloutFleet)
    fleet.cfg, fleet._nodes = RolloutConfig(generate_timeout_s=1.0), {}
    fleet.book = FleetBook(4, call=lambda handle, method, *args: getattr(handle, method).remote(*args))
    fleet.book.add(stuck.make(), 0)
    fleet.book.add(stuck.make(), 1)
    fleet.book.submit([[1]], 1, {}, [0])
    fleet.book.submit([[1]], 1, {}, [1])  # the least busy worker: 1

    class Sync:
        version = 3

        def connect(self):
            pass

        def push(self, version):
            pass

    class Collector:
        requeued = []

        def requeue(self, works):
            self.requeued.extend(works)

    collector = Collector()
    start = time.monotonic()
    resize_fleet(fleet, Sync(), collector, target=1)
    assert time.monotonic() - start < 30
    assert fleet.indices() == [0]
    assert [w.request_ids for w in collector.requeued] == [[1]]  # handed back, generated again elsewhere


def test_learner_start_up_and_calls_time_out_naming_the_rank(stuck):
    from fleetrl.learner.config import LearnerConfig
    from fleetrl.learner.group import LearnerGroup

    group = LearnerGroup.__new__(LearnerGroup)
    group.cfg, group.num_ranks, group.name_prefix, group.role = LearnerConfig(call_timeout_s=1.0), 2, "run/", "learner"
    group._ready_timeout_s = 1.0
    group._in_bundle = lambda i: "DEFAULT"
    group._node_address = stuck.stall
    with pytest.raises(TimeoutError, match=r"the learner start-up \(asking rank 0's node for its address\): "
                                           r"no answer within 1s from a task in learner rank 0's bundle"):
        group._address_of_rank0()
    with pytest.raises(TimeoutError, match=r"a call of the learner ranks \(learner.call_timeout_s\): no answer "
                                           r"within 1s from run/learner-rank-1\. a rank stuck in a collective"):
        group._gather([_done(), stuck.stall.remote()])


def test_reward_actors_that_cannot_start_fail_naming_them(ray_local):
    from fleetrl.reward.actor import make_reward_actors

    cfg = {"functions": [{"name": "len", "kind": "builtin", "builtin": "exact_match"}], "num_cpus": 1000,
           "ready_timeout_s": 2}
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"starting the reward service \(reward.ready_timeout_s\): no answer "
                                           r"within 2s from reward actor 'deadline-test/reward-0'\. Each asks for "
                                           r"\{'CPU': 1000"):
        make_reward_actors(cfg, name_prefix="deadline-test/")
    assert time.monotonic() - start < 30


def test_pump_counts_no_fleet_idle_time_while_a_generation_it_started_runs(stuck):
    # The learner trains while the fleet generates the next step's prompts: pump starts them first,
    # so the wait that follows is busy time, not idle (time/fleet_idle measured the whole wait).
    class BusyFleet(IdleFleet):
        def __init__(self):
            self.calls = []

        def idle_capacity(self):
            return 4 - len(self.calls)

        def submit(self, prompts, **kwargs):
            self.calls.append(stuck.stall.remote())  # never finishes within the pump
            return self.calls[-1]

    cfg = load_config(EXAMPLE, ["rl.max_staleness=1", "rl.prompts_per_step=2", "learner.micro_batch_size=16"])
    rows = [PromptRow(prompt=f"prompt {i}", extra={}, source=f"row {i}") for i in range(8)]
    collector = GroupCollector(cfg, fleet=BusyFleet(), reward_actors=[], stream=PromptStream(rows),
                               tokenizer=WordTokenizer())
    import ray

    @ray.remote(num_cpus=0)
    def train():
        time.sleep(1.0)

    stats = RolloutStats()
    collector.pump([train.remote()], stats, timeout_s=60)
    assert len(collector.fleet.calls) == 4  # (fleet version 0 + staleness 1 + 1) x 2 prompts, one per call
    assert stats.fleet_idle_s < 0.5 and stats.max_prompts_in_flight == 4
    for ref in collector.fleet.calls:
        ray.cancel(ref, force=True)
