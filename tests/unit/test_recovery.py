"""Recovery logic without Ray: the restart supervisor, the reward-actor restart, dead engines as dead
workers, per-request seeds, and the RNG state a checkpoint carries."""

import io
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fleetrl.data.rows import DataError
from fleetrl.env import EnvError
from fleetrl.online.collect import GroupCollector
from fleetrl.online.recovery import recovery_metrics, rng_state, set_rng_state
from fleetrl.online.supervisor import is_restartable, run_supervised
from fleetrl.reward.scorer import RewardError
from fleetrl.rollout.fleet import EngineDead, FleetBook
from fleetrl.run.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


class FakeRunDir:
    actor_prefix = "unit-test-run/"
    name = "x"

    def __init__(self, ckpt=None):
        self.ckpt = ckpt

    def latest_checkpoint(self):
        return self.ckpt


def flaky_run(failures: list[BaseException]):
    calls = []

    def run(cfg, run_dir, restarts=0):
        calls.append((restarts, cfg.run.resume, cfg.run.name if cfg.run.resume else None))
        if failures:
            raise failures.pop(0)
        return Path("/done")
    return run, calls


def test_supervisor_restarts_from_the_last_checkpoint_and_counts(caplog):
    cfg = load_config(EXAMPLE, ["run.max_restarts=2"])
    run, calls = flaky_run([RuntimeError("learner rank 1 died"), TimeoutError("weight sync late")])
    with caplog.at_level(logging.ERROR, logger="fleetrl"):
        assert run_supervised(cfg, FakeRunDir(Path("/runs/x/checkpoints/step-000004")), run) == Path("/done")
    # Restarts resume the same run directory (by its name: a generated one when none was given), and the
    # count reaches the run.
    assert calls == [(0, False, None), (1, True, "x"), (2, True, "x")]
    assert not cfg.run.resume  # the caller's config is left alone
    text = caplog.text
    assert "RuntimeError: learner rank 1 died" in text and "restart 1/2" in text and "step-000004" in text
    assert "TimeoutError: weight sync late" in text and "restart 2/2" in text


def test_supervisor_gives_up_after_max_restarts(caplog):
    cfg = load_config(EXAMPLE, ["run.max_restarts=1"])
    run, calls = flaky_run([RuntimeError("one"), RuntimeError("two")])
    with caplog.at_level(logging.ERROR, logger="fleetrl"), pytest.raises(RuntimeError, match="two"):
        run_supervised(cfg, FakeRunDir(), run)
    assert [c[0] for c in calls] == [0, 1]
    assert "the start (no complete checkpoint yet)" in caplog.text
    assert "failed again after 1 restart(s) (run.max_restarts=1)" in caplog.text


@pytest.mark.parametrize("error", [ConfigError("bad key"), DataError("bad row"), RewardError("fn raised"),
                                   EnvError("env raised"), FileExistsError("run dir")])
def test_supervisor_does_not_restart_what_a_restart_cannot_fix(error):
    cfg = load_config(EXAMPLE, [])
    assert cfg.run.max_restarts == 3  # the default
    run, calls = flaky_run([error])
    with pytest.raises(type(error)):
        run_supervised(cfg, FakeRunDir(), run)
    assert len(calls) == 1 and not is_restartable(error)


def test_a_dead_engine_is_a_dead_worker():
    book = FleetBook(2, call=lambda handle, method, *args: object(), dead_errors=(EngineDead,))
    book.add("w0")
    book.add("w1")
    fut = book.submit([[1, 2]], n=2, sampling={}, request_ids=[7])

    def get(_):
        raise EngineDead("rollout worker 0: its vLLM engine died")
    finished = book.finish(fut, get)
    assert finished.lost and finished.dead_worker == 0 and finished.work.request_ids == [7]
    other = book.submit([[1]], n=1, sampling={}, request_ids=[8])
    with pytest.raises(ValueError):  # any other error is the run's
        book.finish(other, lambda _: (_ for _ in ()).throw(ValueError("bad")))


class FakeActor:
    def __init__(self, name):
        self.name, self.calls = name, []
        self.score = SimpleNamespace(remote=self._remote)

    def _remote(self, prompts, completions, columns, raw_prompts=None):
        self.calls.append(prompts)
        return (self.name, len(self.calls))  # a hashable stand-in for an ObjectRef


def _groups(n):
    return [SimpleNamespace(prompt_index=i, row=SimpleNamespace(extra={"letter": "a"}, prompt=f"p{i}"),
                            samples=[SimpleNamespace(prompt_text=f"p{i}", completion_text="aa", episode=None)])
            for i in range(n)]


def test_a_dead_reward_actor_is_restarted_once_and_its_groups_scored_again():
    cfg = load_config(EXAMPLE, ["reward.num_workers=2"])
    actors = [FakeActor("r0"), FakeActor("r1")]
    started = []

    def restart(index, dead):
        started.append((index, dead.name))
        return FakeActor(f"r{index}-new")
    collector = GroupCollector(cfg, fleet=None, reward_actors=actors, stream=None, tokenizer=None)
    collector.restart_reward_actor = restart
    a, b = _groups(1), _groups(2)
    collector._score(a)  # -> r0
    collector._score(b)  # -> r1
    collector._score(_groups(1))  # -> r0 again
    ref_a, _, ref_c = list(collector._reward_refs)
    dead = actors[0]
    for ref in (ref_a, ref_c):  # both calls of the dead actor come back lost
        groups = collector._reward_refs.pop(ref)
        collector._reward_actor_died(ref, groups, RuntimeError("actor died"))
    assert started == [(0, "r0")]  # one restart per death
    assert actors[0] is not dead and actors[0].name == "r0-new"  # replaced in place (shutdown frees it)
    assert collector.reward_restarts == 1 and collector.rescored_groups == 2
    rescored = [g for groups in collector._reward_refs.values() for g in groups]
    assert a[0] in rescored  # scored again, on the restarted actor or the other one
    assert recovery_metrics(collector, restarts=2) == {"run/restarts": 2, "reward/restarts": 1,
                                                      "reward/rescored_groups": 2}


def test_without_a_restart_function_a_dead_reward_actor_ends_the_run():
    cfg = load_config(EXAMPLE, [])
    collector = GroupCollector(cfg, fleet=None, reward_actors=[FakeActor("r0")], stream=None, tokenizer=None)
    collector._score(_groups(1))
    ref = next(iter(collector._reward_refs))
    with pytest.raises(RuntimeError, match="actor died"):
        collector._reward_actor_died(ref, collector._reward_refs.pop(ref), RuntimeError("actor died"))


def test_rng_state_survives_a_tensor_only_checkpoint():
    random.seed(3)
    torch.manual_seed(3)
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    want = (random.random(), torch.rand(3))
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert random.random() == want[0] and torch.equal(torch.rand(3), want[1])


def test_per_request_seed_depends_on_the_request_only():
    from vllm import SamplingParams

    from fleetrl.rollout.worker import RolloutWorker

    def worker(seed_per_request, seed=0):
        return SimpleNamespace(cfg=SimpleNamespace(seed_per_request=seed_per_request, seed=seed))
    params = SamplingParams(n=4, temperature=1.0)
    on = RolloutWorker._params_for
    assert on(worker(False), 5, params) is params  # off by default
    s5, s5b, s6 = on(worker(True), 5, params).seed, on(worker(True), 5, params).seed, on(worker(True), 6, params).seed
    assert s5 == s5b and s5 != s6 and on(worker(True, seed=1), 5, params).seed != s5
    assert params.seed is None  # the shared params are not changed
    explicit = SamplingParams(n=1, seed=42)
    assert on(worker(True), 5, explicit).seed == 42  # a user's own seed wins
