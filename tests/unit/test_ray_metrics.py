"""Name mapping and export logic of the Ray metrics exporter, with fake metric classes (no Ray)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetrl.metrics import ray_metrics
from fleetrl.metrics.ray_metrics import RayMetricsExporter, metric_name, plan_row

PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Ray also refuses ':'


class FakeMetric:
    def __init__(self, name, description="", tag_keys=None):
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.calls = []

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags)))

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Ray counters refuse non-positive increments"
        self.calls.append(("inc", value, dict(tags)))


def fake_exporter(run="r1"):
    made = {}

    def factory(name, description, tag_keys=None):
        made[name] = FakeMetric(name, description, tag_keys)
        return made[name]

    return RayMetricsExporter(run, gauge_factory=factory, counter_factory=factory), made


@pytest.mark.parametrize("key, name", [
    ("reward/mean", "fleetrl_reward_mean"),
    ("tokens_per_s", "fleetrl_tokens_per_s"),
    ("time/weight_sync", "fleetrl_time_weight_sync"),
    ("train/policy_loss", "fleetrl_train_policy_loss"),
    ("queue_depth/reward", "fleetrl_queue_depth_reward"),
    ("weight_version", "fleetrl_weight_version"),
    ("reward/my-rule.v2", "fleetrl_reward_my_rule_v2"),
    ("kl:ref//x", "fleetrl_kl_ref_x"),
    ("/leading/", "fleetrl_leading"),
    ("2nd", "fleetrl_2nd"),
    ("réponse", "fleetrl_r_ponse"),
])
def test_metric_name(key, name):
    assert metric_name(key) == name
    assert PROMETHEUS_NAME.match("ray_" + name)


def test_metric_name_without_usable_characters_is_an_error():
    with pytest.raises(ValueError, match="no letters or digits"):
        metric_name("//")


def test_every_documented_key_maps_to_a_distinct_legal_name():
    keys = list(ray_metrics.DOCUMENTED) + list(ray_metrics.COUNTED) + [ray_metrics.STEPS_COUNTER]
    names = [metric_name(k) for k in keys]
    assert len(set(names)) == len(names)
    assert all(PROMETHEUS_NAME.match(n) for n in names)


def test_plan_row_kinds_and_filtering():
    row = {
        "step": 3, "reward/mean": 0.25, "tokens_per_s": 1000, "reward/errors": 2,
        "groups/skipped_constant": 0, "train/kl": float("nan"), "note": "text", "missing": None,
        "done": True,
    }
    plan = {(kind, name): value for kind, name, _, value in plan_row(row)}
    assert plan == {
        ("gauge", "fleetrl_step"): 3.0,
        ("gauge", "fleetrl_reward_mean"): 0.25,
        ("gauge", "fleetrl_tokens_per_s"): 1000.0,
        ("gauge", "fleetrl_done"): 1.0,
        ("counter", "fleetrl_reward_errors"): 2.0,  # a count: a counter, not a gauge
        ("counter", "fleetrl_steps"): 1.0,  # one per row
    }  # zero count, NaN, text and None are not recorded


def test_export_sets_gauges_and_counters_with_the_run_tag():
    exp, made = fake_exporter("grpo-1")
    assert exp.export({"step": 1, "reward/mean": 0.5, "reward/errors": 3, "queue_depth/reward": 4}) == 5
    assert exp.export({"step": 2, "reward/mean": 0.75, "reward/errors": 1}) == 4
    tag = {"run": "grpo-1"}
    assert made["fleetrl_reward_mean"].calls == [("set", 0.5, tag), ("set", 0.75, tag)]
    assert made["fleetrl_reward_errors"].calls == [("inc", 3.0, tag), ("inc", 1.0, tag)]
    assert made["fleetrl_steps"].calls == [("inc", 1.0, tag), ("inc", 1.0, tag)]
    assert made["fleetrl_queue_depth_reward"].calls == [("set", 4.0, tag)]
    assert made["fleetrl_reward_mean"].tag_keys == ("run",)
    # Documented keys carry their description; families and unknown keys a generic one.
    assert made["fleetrl_reward_mean"].description == ray_metrics.DOCUMENTED["reward/mean"]
    assert "queue" in made["fleetrl_queue_depth_reward"].description
    assert exp.names["reward/mean"] == "fleetrl_reward_mean"


def test_metrics_are_created_once_per_name():
    exp, made = fake_exporter()
    for step in range(5):
        exp.export({"step": step, "time/step": 1.0})
    assert sorted(made) == ["fleetrl_step", "fleetrl_steps", "fleetrl_time_step"]


def test_two_keys_with_one_name_first_wins_and_the_other_is_skipped_with_a_warning(caplog):
    exp, made = fake_exporter()
    with caplog.at_level("WARNING"):
        exp.export({"reward/mean": 1.0, "reward_mean": 2.0})
        exp.export({"reward/mean": 3.0, "reward_mean": 4.0})
    assert [c[1] for c in made["fleetrl_reward_mean"].calls] == [1.0, 3.0]
    assert exp.skipped == {"reward_mean"}
    assert sum("reward_mean" in r.message for r in caplog.records) == 1  # warned once


def test_too_many_distinct_metrics_are_capped(monkeypatch):
    monkeypatch.setattr(ray_metrics, "MAX_METRICS", 4)
    exp, made = fake_exporter()
    exp.export({f"k{i}": 1.0 for i in range(10)})
    assert len(made) == 4
    assert len(exp.skipped) == 7  # 10 gauges + the steps counter, 4 kept


def test_real_exporter_refuses_a_process_not_connected_to_ray():
    # In a fresh process: the e2e tests may hold a Ray session open in this one.
    code = (
        "from fleetrl.metrics.ray_metrics import RayMetricsExporter\n"
        "try:\n    RayMetricsExporter('r')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert "refused:" in out.stdout and "ray.init" in out.stdout, out.stdout + out.stderr


def test_cli_rejects_pairs_that_are_not_numbers():
    with pytest.raises(SystemExit, match="KEY=NUMBER"):
        ray_metrics.main(["--run", "x", "reward/mean=high"])
