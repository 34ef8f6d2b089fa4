"""Console progress of long phases (Ticker) and what an offline run says and exports: reference
precompute and evaluation progress lines, every metrics row also sent to the Ray metrics exporter."""

from __future__ import annotations

import io
import json

from fleetrl.metrics.local import Ticker
from fleetrl.metrics.ray_metrics import RayMetricsExporter
from fleetrl.testing.tasks import preference_task, unpaired_task
from tests.unit.test_offline_run import FakeLearner, make_run


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_ticker_says_each_tenth_after_a_quiet_start_and_always_the_end():
    out, clock = io.StringIO(), Clock()
    ticker = Ticker("precomputing", 100, stream=out, clock=clock, every_s=30.0, quiet_s=2.0)
    ticker.advance(5)  # within quiet_s: silent
    clock.t = 3.0
    ticker.advance(5)  # 10 %
    ticker.advance(3)  # 13 %: same tenth, silent
    clock.t = 40.0
    ticker.advance(1)  # 14 %, but 37 s since the last line
    ticker.advance(86)  # done
    assert out.getvalue().splitlines() == [
        "fleetrl: precomputing: 10/100 sequences (3.0s)",
        "fleetrl: precomputing: 14/100 sequences (40.0s)",
        "fleetrl: precomputing: 100/100 sequences (40.0s)",
    ]


def test_a_quick_phase_prints_only_its_last_line():
    out, clock = io.StringIO(), Clock()
    ticker = Ticker("eval at step 3", 4, unit="pairs", stream=out, clock=clock)
    for _ in range(4):
        ticker.advance(1)
    assert out.getvalue() == "fleetrl: eval at step 3: 4/4 pairs (0.0s)\n"
    quiet = io.StringIO()
    ticker = Ticker("eval", 4, stream=quiet, clock=clock, last_line=False)  # the caller sums it up
    ticker.advance(4)
    assert quiet.getvalue() == ""


class FakeGauge:
    values: dict[str, list[float]] = {}

    def __init__(self, name, description, tag_keys=()):
        self.name = name

    def set(self, value, tags=None):
        FakeGauge.values.setdefault(self.name, []).append(value)

    inc = set


def test_offline_run_reports_precompute_and_eval_progress_and_exports_every_row(tmp_path, capsys):
    run = make_run(tmp_path, "dpo", preference_task(12), preference_task(4, seed=1),
                   offline={"eval_every": 2, "eval_batch_size": 4})
    FakeGauge.values = {}
    exporter = RayMetricsExporter("r", gauge_factory=FakeGauge, counter_factory=FakeGauge)
    run.run(FakeLearner("dpo"), exporter)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fleetrl: ")]
    # 4 held-out pairs = 8 sequences, 12 training pairs = 24 sequences, all before the first step.
    assert any(ln.startswith("fleetrl: reference log-probs of the held-out data: 8/8 sequences (") for ln in lines)
    precompute = [ln for ln in lines if ln.startswith("fleetrl: precomputing reference log-probs of the training")]
    assert precompute and precompute[-1].startswith(
        "fleetrl: precomputing reference log-probs of the training data: 24/24 sequences (")
    evals = [ln for ln in lines if ln.startswith("fleetrl: eval at step ")]  # one summary line each
    assert [ln.split(":")[1] for ln in evals] == [" eval at step 0", " eval at step 2", " eval at step 3"]
    assert "loss " in evals[0] and "accuracy " in evals[0] and "on 4 held-out examples" in evals[0]
    # Every row of metrics.jsonl went to Ray as well.
    rows = [json.loads(x) for x in run.run_dir.metrics_path.read_text().splitlines()]
    assert FakeGauge.values["fleetrl_step"] == [float(r["step"]) for r in rows]
    assert FakeGauge.values["fleetrl_train_loss"] == [r["train/loss"] for r in rows if "train/loss" in r]
    assert FakeGauge.values["fleetrl_eval_accuracy"] == [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert len(FakeGauge.values["fleetrl_steps"]) == len(rows)


def test_kto_precompute_reports_its_kl_terms(tmp_path, capsys):
    run = make_run(tmp_path, "kto", unpaired_task(8))
    run.run(FakeLearner("kto"))
    out = capsys.readouterr().out
    steps = run.schedule.total_steps
    assert f"fleetrl: precomputing KTO's reference KL terms: {steps}/{steps} steps (" in out
