"""Training metrics as Ray custom metrics, for the Ray dashboard's Prometheus/Grafana views.

The loop hands :meth:`RayMetricsExporter.export` the same per-step row it writes to
``metrics.jsonl``. Every numeric value becomes a gauge named ``fleetrl_<key>`` where each
character outside ``[A-Za-z0-9_]`` is mapped to ``_`` (``reward/mean`` -> ``fleetrl_reward_mean``,
``queue_depth/reward`` -> ``fleetrl_queue_depth_reward``), tagged ``run=<run name>``. Per-step
counts in :data:`COUNTED` become counters instead, so Grafana can ``rate()`` them. Ray serves
them on each node's metrics export port (``ray start --metrics-export-port=PORT``, then
``GET http://NODE:PORT/metrics``) with its ``ray_`` prefix and ``_total`` on counters:
``ray_fleetrl_reward_mean{run="grpo-..."}``, ``ray_fleetrl_reward_errors_total{...}``.

Call it from a process connected to Ray (the driver after ``ray.init``; a Ray job's driver is).
Smoke-test the path to Prometheus without training::

    python -m fleetrl.metrics.ray_metrics --run smoke reward/mean=0.5 tokens_per_s=1200   # on the head
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "fleetrl_"
RUN_TAG = "run"

# The metrics the dashboards are built on: row key -> description (the Prometheus HELP text).
# Any other numeric key of a row is exported too, with a generic description.
DOCUMENTED: dict[str, str] = {
    "step": "Training step just finished.",
    "reward/mean": "Mean reward of the step's samples.",
    "reward/std": "Standard deviation of the step's rewards.",
    "tokens_per_s": "Tokens generated per second of generation time, whole fleet.",
    "time/generate": "Seconds spent generating this step's samples.",
    "time/reward": "Seconds the reward service spent scoring this step's samples.",
    "time/reward_wait": "Seconds waiting for rewards after generation finished.",
    "time/reference": "Seconds computing reference-model log-probs.",
    "time/train": "Seconds in optimizer updates this step.",
    "time/weight_sync": "Seconds sending new weights to the rollout fleet.",
    "time/step": "Wall-clock seconds of the whole step.",
    "weight_version": "Weight version the fleet serves after this step's sync.",
    "staleness/max": "Largest gap between the trained and the generating weight versions.",
    "staleness/mean": "Mean gap between the learner's version and the oldest weights of each trained group.",
    "buffer/depth": "Scored groups waiting for the learner after this step took its own.",
    "rollout/in_flight_updates": "Trained samples whose generation saw a weight update land mid-way.",
    "is/weight_mean": "Mean importance weight pi_learner / pi_sampler before truncation or masking.",
    "mismatch/abs_logp_diff": "Mean |learner - sampler| log-prob on tokens sampled with the learner's weights.",
    "time/learner_wait": "Seconds the learner waited for scored groups.",
    "time/fleet_idle": "Seconds no generation was in flight while the learner trained.",
    "train/policy_loss": "Policy loss, mean over the step's optimizer steps.",
    "train/kl": "KL to the reference policy, mean over the step's optimizer steps.",
    "train/grad_norm": "Gradient norm, mean over the step's optimizer steps.",
    "response_length/mean": "Mean completion length in tokens.",
    "prompts_in_flight": "Prompts sent to the fleet whose completions have not come back.",
    "rollout/num_workers": "Rollout workers in the fleet.",
}
# Families documented by prefix: any key starting with one is a documented gauge.
DOCUMENTED_PREFIXES: dict[str, str] = {
    "queue_depth/": "Items waiting in this queue.",
    "time/": "Seconds spent in this phase of the step.",
    "reward/": "Per-step reward statistic.",
    "train/": "Learner statistic, mean over the step's optimizer steps.",
}
# Per-step counts: exported as counters (running totals) rather than gauges.
COUNTED: dict[str, str] = {
    "reward/errors": "Samples whose reward function failed (scored 0).",
    "prompts/skipped_too_long": "Prompts skipped for exceeding rl.max_prompt_tokens.",
    "groups/skipped_constant": "Groups dropped because all their rewards were equal.",
    "groups/dropped_stale": "Groups older than rl.max_staleness, generated again.",
}
STEPS_COUNTER = "steps"  # one more per exported row: rate() gives steps per second

# More distinct metrics than this means the row keys are not a fixed set (a bug upstream).
MAX_METRICS = 512


def metric_name(key: str) -> str:
    """The Prometheus-legal gauge/counter name for a metrics-row key (without Ray's ``ray_``)."""
    body = re.sub(r"[^A-Za-z0-9_]", "_", key)  # ':' is legal Prometheus, but Ray warns on it
    body = re.sub(r"_+", "_", body).strip("_")
    if not body:
        raise ValueError(f"metrics key {key!r} has no letters or digits to name a metric after")
    return PREFIX + body


def describe(key: str) -> str:
    if key in DOCUMENTED:
        return DOCUMENTED[key]
    if key in COUNTED:
        return COUNTED[key]
    for prefix, text in DOCUMENTED_PREFIXES.items():
        if key.startswith(prefix):
            return f"{text} ({key})"
    return f"fleetrl metric {key!r} (per step)."


def numeric(value: Any) -> float | None:
    """The value as a float if it is a finite number (bools count as 0/1), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def plan_row(row: Mapping[str, Any]) -> list[tuple[str, str, str, float]]:
    """What one row exports: ``(kind, metric name, key, value)`` with kind ``gauge`` or
    ``counter``. Non-numeric values are not metrics; NaN/inf and zero counts are left out
    (a gauge cannot say "unknown", a counter only goes up)."""
    out = []
    for key, value in row.items():
        v = numeric(value)
        if v is None:
            continue
        if key in COUNTED:
            if v > 0:
                out.append(("counter", metric_name(key), key, v))
        else:
            out.append(("gauge", metric_name(key), key, v))
    out.append(("counter", metric_name(STEPS_COUNTER), STEPS_COUNTER, 1.0))
    return out


def _ray_factories() -> tuple[Callable, Callable]:
    import ray
    from ray.util.metrics import Counter, Gauge

    if not ray.is_initialized():
        raise RuntimeError(
            "RayMetricsExporter needs a process connected to Ray: create it after ray.init() "
            "(metrics recorded before that are silently lost by Ray)"
        )
    return Gauge, Counter


# Ray keeps one metric per name per process: share them between exporters (runs differ by tag).
_METRICS: dict[str, Any] = {}


class RayMetricsExporter:
    """Sets ``fleetrl_*`` gauges and counters, tagged ``run=run_name``, from per-step rows.

    ``gauge_factory``/``counter_factory`` (``cls(name, description, tag_keys=...)``) default to
    ``ray.util.metrics.Gauge``/``Counter``; tests pass fakes.
    """

    def __init__(self, run_name: str, *, gauge_factory: Callable | None = None,
                 counter_factory: Callable | None = None):
        if not run_name:
            raise ValueError("RayMetricsExporter needs a run name (the `run` tag of every metric)")
        if gauge_factory is None or counter_factory is None:
            gauge, counter = _ray_factories()
            gauge_factory = gauge_factory or gauge
            counter_factory = counter_factory or counter
            self._cache = _METRICS
        else:
            self._cache = {}
        self.run_name = run_name
        self._factories = {"gauge": gauge_factory, "counter": counter_factory}
        self._tags = {RUN_TAG: run_name}
        self._key_of: dict[str, str] = {}  # metric name -> the row key that owns it
        self.skipped: set[str] = set()  # keys not exported (name clash or too many metrics), warned once

    @property
    def names(self) -> dict[str, str]:
        """Row key -> metric name, for every key exported so far."""
        return {key: name for name, key in self._key_of.items()}

    def export(self, row: Mapping[str, Any]) -> int:
        """Record one row; returns how many values were recorded."""
        n = 0
        for kind, name, key, value in plan_row(row):
            metric = self._metric(kind, name, key)
            if metric is None:
                continue
            if kind == "gauge":
                metric.set(value, tags=self._tags)
            else:
                metric.inc(value, tags=self._tags)
            n += 1
        return n

    def _metric(self, kind: str, name: str, key: str):
        owner = self._key_of.get(name)
        if owner is not None and owner != key:
            self._skip(key, f"its metric name {name} is taken by key {owner!r}; rename one of them")
            return None
        cached = self._cache.get(name)
        if cached is not None and cached[0] != kind:
            self._skip(key, f"{name} already exists as a {cached[0]}")
            return None
        if cached is None:
            if len(self._cache) >= MAX_METRICS:
                self._skip(key, f"more than {MAX_METRICS} distinct metrics: row keys must be a fixed set")
                return None
            cached = (kind, self._factories[kind](name, describe(key), tag_keys=(RUN_TAG,)))
            self._cache[name] = cached
        self._key_of[name] = key
        return cached[1]

    def _skip(self, key: str, why: str) -> None:
        if key not in self.skipped:
            self.skipped.add(key)
            log.warning("fleetrl: metric %r is not exported to Ray: %s", key, why)


def _parse_pairs(pairs: list[str]) -> dict[str, float]:
    row = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            row[key] = float(raw)
        except ValueError:
            raise SystemExit(f"ray_metrics: {text!r} is not KEY=NUMBER (e.g. reward/mean=0.5)") from None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fleetrl.metrics.ray_metrics",
        description="Export one row of fleetrl metrics to Ray, to check the path to the dashboard's "
        "Prometheus endpoint without training. Connects to --address, else RAY_ADDRESS, else the Ray "
        "running on this machine (never starts one); the values "
        "show up as ray_fleetrl_<key>{run=RUN} on the node's metrics export port ~10 s later.",
    )
    p.add_argument("pairs", nargs="+", metavar="KEY=NUMBER", help="metrics-row entries, e.g. reward/mean=0.5")
    p.add_argument("--run", required=True, help="value of the `run` tag")
    p.add_argument("--address", default=None, help="Ray address for ray.init (default: RAY_ADDRESS or auto)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="seconds to stay connected after exporting (default 0: Ray flushes on exit)")
    args = p.parse_args(argv)
    row = _parse_pairs(args.pairs)

    import ray

    # Never start a new local Ray: the point is to reach the running cluster's metrics agent.
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level=logging.WARNING)
    exporter = RayMetricsExporter(args.run)
    n = exporter.export(row)
    for key, name in sorted(exporter.names.items()):
        print(f"fleetrl: exported {key} as {name} (Prometheus: ray_{name})", flush=True)
    print(f"fleetrl: exported {n} values for run {args.run!r}", flush=True)
    if args.hold > 0:
        time.sleep(args.hold)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
