"""`fleetrl plot`: curves planned from metrics.jsonl, drawn and written as PNGs, runs overlaid,
missing keys noted, bad paths refused with a message."""

from __future__ import annotations

import json

import pytest

from fleetrl.cli import main
from fleetrl.metrics.plot import PlotError, draw, load_run, plan, plot_runs, smooth


def write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_rows(n=5, scale=1.0):
    rows = [{"step": 0, "eval/reward/mean": 0.1, "eval/prompts": 8, "time/eval": 1.0}]
    for s in range(1, n + 1):
        rows.append({"step": s, "reward/mean": scale * s / 10, "train/kl": 0.01 * s,
                     "response_length/mean": 20 + s, "train/policy_loss": -0.1 * s,
                     "time/generate": 2.0, "time/train": 1.0, "time/step": 3.5, "bad": float("nan")})
    rows[-1].update({"eval/reward/mean": 0.5, "time/eval": 1.0})
    return rows


def offline_rows(n=3):
    return [{"step": 0, "eval/accuracy": 0.5, "time/reference": 2.0}] + [
        {"step": s, "train/loss": 1.0 / s, "time/train": 0.5, "time/step": 0.6} for s in range(1, n + 1)]


def curves(fig):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}


def test_one_online_run_gives_every_figure_with_the_logged_values(tmp_path):
    run = write_run(tmp_path / "grpo-a", online_rows())
    written, notes = plot_runs([run], tmp_path / "out")
    assert {f.name for f in written} == {"reward.png", "kl.png", "length.png", "loss.png", "eval.png",
                                         "step_time_curve.png", "step_time.png"}
    assert all(f.stat().st_size > 5000 for f in written)  # a drawn PNG, not an empty canvas
    assert notes == []
    panels = {p.name: p for p in plan([load_run(run)])[0]}
    reward = curves(draw(panels["reward"]))
    assert reward == {"grpo-a": ([1, 2, 3, 4, 5], [0.1, 0.2, 0.3, 0.4, 0.5])}
    assert curves(draw(panels["eval"])) == {"grpo-a: eval/reward/mean": ([0, 5], [0.1, 0.5])}
    # The breakdown: mean seconds per phase over training steps (step 0 is the first eval only).
    bars = panels["step_time"]
    assert bars.categories == ["step (total)", "eval", "generate", "train"]
    assert bars.curves[0].values == pytest.approx([3.5, 0.2, 2.0, 1.0])  # one eval in 5 steps: 0.2 s per step
    heights = [patch.get_height() for patch in draw(bars).axes[0].patches]
    assert heights == pytest.approx([3.5, 0.2, 2.0, 1.0])


def test_two_runs_are_overlaid_and_missing_keys_are_noted(tmp_path):
    a = write_run(tmp_path / "a", online_rows())
    b = write_run(tmp_path / "b", offline_rows())
    panels, notes = plan([load_run(a), load_run(b)])
    by_name = {p.name: p for p in panels}
    assert [c.label for c in by_name["loss"].curves] == ["a: train/policy_loss", "b: train/loss"]
    assert [c.label for c in by_name["step_time_curve"].curves] == ["a", "b"]
    fig = draw(by_name["eval"])
    assert set(curves(fig)) == {"a: eval/reward/mean", "b: eval/accuracy"}
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == set(curves(fig))
    assert "b: no reward/mean in metrics.jsonl; its reward curve is skipped" in notes
    assert [c.label for c in by_name["reward"].curves] == ["a"]
    # Phases are the union of both runs; a run without one shows 0 there.
    bars = by_name["step_time"]
    assert bars.categories == ["step (total)", "eval", "generate", "reference", "train"]
    assert bars.curves[0].values == pytest.approx([3.5, 0.2, 2.0, 0.0, 1.0])
    assert bars.curves[1].values == pytest.approx([0.6, 0.0, 0.0, 0.0, 0.5])  # step 0's reference time: not a step


def test_a_figure_no_run_has_is_not_written_and_said_so(tmp_path):
    run = write_run(tmp_path / "sft", offline_rows())
    written, notes = plot_runs([run], tmp_path / "out")
    assert "reward.png" not in {f.name for f in written}
    assert "no run has reward/mean: reward.png not written" in notes


def test_same_run_names_are_told_apart_by_path(tmp_path):
    a = write_run(tmp_path / "x" / "run", online_rows())
    b = write_run(tmp_path / "y" / "run", online_rows(scale=2))
    written, _ = plot_runs([a, b], tmp_path / "out")
    assert (tmp_path / "out" / "reward.png") in written
    panel = next(p for p in plan([load_run(a, str(a)), load_run(b, str(b))])[0] if p.name == "reward")
    assert [c.label for c in panel.curves] == [str(a), str(b)]
    assert panel.curves[1].values == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_smoothing_is_a_trailing_mean_drawn_over_the_raw_values(tmp_path):
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert smooth([1, 2], 0) == [1, 2]
    run = load_run(write_run(tmp_path / "r", online_rows()))
    panel = next(p for p in plan([run], smooth_window=2)[0] if p.name == "reward")
    lines = curves(draw(panel))
    assert lines["r"][1] == pytest.approx([0.1, 0.15, 0.25, 0.35, 0.45])
    assert lines["_raw r"][1] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert [t.get_text() for t in draw(panel).axes[0].get_legend().get_texts()] == ["r"]


def test_bad_paths_and_bad_rows_are_clear_errors(tmp_path, capsys):
    with pytest.raises(PlotError, match="not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match=r"not a run directory \(no metrics.jsonl"):
        load_run(tmp_path / "empty")
    bad = write_run(tmp_path / "bad", online_rows(2))
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:4: not a JSON object"):
        load_run(bad)
    assert main(["plot", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "empty: not a run directory" in err and "Traceback" not in err


def test_cli_writes_into_the_run_dir_by_default(tmp_path, capsys):
    run = write_run(tmp_path / "r", online_rows())
    assert main(["plot", str(run), "--smooth", "2"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run / 'plots' / 'reward.png'}" in out
    assert (run / "plots" / "step_time.png").is_file()
