"""metrics.jsonl, TensorBoard and the progress line."""

import io
import json
import sys

import pytest

from fleetrl.metrics.local import MetricsWriter, Progress


def test_rows_are_json_lines_with_step_and_non_finite_as_null(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    w.write({"step": 1, "reward/mean": 0.5, "train/kl": float("nan"), "note": "x"})
    w.write({"step": 2, "reward/mean": 0.75})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "reward/mean": 0.5, "train/kl": None, "note": "x"},
                    {"step": 2, "reward/mean": 0.75}]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_append_keeps_earlier_rows(tmp_path):
    MetricsWriter(tmp_path / "m.jsonl").write({"step": 1})
    w = MetricsWriter(tmp_path / "m.jsonl", append=True)
    w.write({"step": 2})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]


def test_a_row_without_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs a 'step'"):
        MetricsWriter(tmp_path / "m.jsonl").write({"reward": 1.0})


def test_wandb_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'fleetrl\[wandb\]'"):
        MetricsWriter(tmp_path / "m.jsonl", wandb={"project": "p"})


def test_progress_line_has_step_reward_and_eta():
    out = io.StringIO()
    p = Progress(total=10, stream=out)
    p.update(1, {"reward/mean": 0.25, "time/step": 1.5})
    line = out.getvalue()
    assert "step 1/10" in line and "reward 0.25" in line and "eta " in line


def test_reward_per_function_comes_from_the_trained_samples_not_this_steps_scoring():
    # Async rollouts: a step may train groups scored in earlier steps, so this step's scoring
    # stats are empty; reward/<function> must still describe the samples trained on.
    import torch

    from fleetrl.online.batch import Sample
    from fleetrl.online.collect import RolloutStats
    from fleetrl.online.loop import _reward_metrics

    samples = [Sample(0, "", [1], [2], [0.0], "stop", 0, reward=r, reward_parts={"letter": r, "len": 1.0})
               for r in (1.0, 0.0, 0.0, 1.0)]
    m = _reward_metrics(torch.tensor([s.reward for s in samples]), samples, RolloutStats())
    assert m["reward/letter"] == 0.5 and m["reward/len"] == 1.0 and m["reward/mean"] == 0.5
