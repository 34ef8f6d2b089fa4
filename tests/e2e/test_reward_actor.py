"""Reward actors on a real local Ray: named actors score batches; errors arrive with their message."""

from __future__ import annotations

import pytest

from fleetrl.reward import RewardError, RewardScorer, make_reward_actors

pytestmark = pytest.mark.e2e

RULES = """
import os

def with_pid(prompts, completions, **columns):
    # The value tells which process scored the sample: it must not be the test process.
    return [float(len(c)) for c in completions]

def worker_pid(prompts, completions, **columns):
    return [float(os.getpid())] * len(completions)

def explode(prompts, completions, **columns):
    return [1.0 / (len(c) - 4) for c in completions]
"""


def config(functions, **kw) -> dict:
    return {"functions": functions, "num_workers": 2, "num_cpus": 0.5, **kw}


@pytest.fixture()
def rules_dir(tmp_path):
    (tmp_path / "rules.py").write_text(RULES)
    return tmp_path


def test_two_named_actors_score_batches(ray_local, rules_dir):
    ray = ray_local
    cfg = config([
        {"name": "len", "kind": "rule", "path": "rules.py:with_pid", "weight": 0.5},
        {"name": "pid", "kind": "rule", "path": "rules.py:worker_pid", "weight": 0.0},
        {"name": "num", "kind": "builtin", "builtin": "numeric_answer"},
    ])
    actors = make_reward_actors(cfg, base_dir=rules_dir, name_prefix="e2e-ok-")
    try:
        assert [ray.get_actor(f"e2e-ok-reward-{i}") for i in range(2)]  # named, in the caller's namespace
        batches = [
            (["p1", "p2"], ["#### 7", "#### 8"], {"answer": ["7", "7"]}),
            (["p3", "p4", "p5"], ["x #### 1,000", "#### -2", "none"], {"answer": ["1000", "-2", "3"]}),
        ]
        refs = [actor.score.remote(*batch) for actor, batch in zip(actors, batches)]
        results = ray.get(refs)
        local = RewardScorer(cfg, base_dir=rules_dir)
        for result, batch in zip(results, batches):
            expected = local.score(*batch)
            assert result.rewards == expected.rewards
            assert result.per_function["num"] == expected.per_function["num"]
            assert result.errors == []
        assert results[0].per_function["num"] == [1.0, 0.0]
        assert results[1].rewards == [0.5 * 12 + 1.0, 0.5 * 7 + 1.0, 0.5 * 4]
        pids = {r.per_function["pid"][0] for r in results}
        assert len(pids) == 2 and os_pid() not in pids  # two actor processes did the work
    finally:
        for actor in actors:
            ray.kill(actor)


def os_pid() -> float:
    import os

    return float(os.getpid())


def test_error_inside_actor_arrives_with_its_message(ray_local, rules_dir):
    ray = ray_local
    cfg = config([{"name": "ratio", "kind": "rule", "path": "rules.py:explode"}])
    actors = make_reward_actors(cfg, base_dir=rules_dir, name_prefix="e2e-err-")
    try:
        with pytest.raises(RewardError) as err:
            ray.get(actors[1].score.remote(["p0", "the bad prompt"], ["12345", "four"]))
        msg = str(err.value)
        assert "reward function 'ratio' (rule rules.py:explode) failed on sample 1 of 2" in msg
        assert "ZeroDivisionError" in msg
        assert "prompt: 'the bad prompt'" in msg and "completion: 'four'" in msg
        # The actor survives a scoring error and keeps serving.
        assert ray.get(actors[1].score.remote(["p"], ["123456"])).rewards == [0.5]
        zero = make_reward_actors({**cfg, "on_error": "zero", "num_workers": 1}, rules_dir, "e2e-zero-")
        result = ray.get(zero[0].score.remote(["p0", "p1"], ["12345", "four"]))
        assert result.rewards == [1.0, 0.0]
        assert [(e.function, e.index) for e in result.errors] == [("ratio", 1)]
        ray.kill(zero[0])
    finally:
        for actor in actors:
            ray.kill(actor)


def test_actor_that_cannot_load_fails_start_and_frees_its_name(ray_local, rules_dir):
    ray = ray_local
    bad = config([{"name": "acc", "kind": "rule", "path": "missing.py:f"}])
    with pytest.raises(Exception, match=r"missing.py:f.*not found") as err:
        make_reward_actors(bad, base_dir=rules_dir, name_prefix="e2e-load-")
    assert "RewardLoadError" in str(err.value) or "reward function 'acc'" in str(err.value)
    good = config([{"name": "acc", "kind": "rule", "path": "rules.py:with_pid"}])
    actors = make_reward_actors(good, base_dir=rules_dir, name_prefix="e2e-load-")  # names were freed
    try:
        assert ray.get(actors[0].describe.remote()) == [
            {"name": "acc", "function": "rule rules.py:with_pid", "weight": 1.0}
        ]
        with pytest.raises(ValueError, match="name_prefix"):
            make_reward_actors(good, base_dir=rules_dir, name_prefix="e2e-load-")
    finally:
        for actor in actors:
            ray.kill(actor)
