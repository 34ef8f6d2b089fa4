"""Pictures of runs: PNGs of reward, KL, length, loss, eval and the step-time breakdown from the
``metrics.jsonl`` of one or more run directories, several runs overlaid (``fleetrl plot``).

The work is split so that tests can check the data without reading pixels: ``load_run`` parses a run
directory, ``plan`` decides every figure's curves (plain lists of numbers) and says what it skipped,
``draw`` turns one planned figure into a matplotlib ``Figure`` (Agg backend), ``plot_runs`` writes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A path that is not a run directory, or a metrics file that cannot be read."""


@dataclass
class Run:
    name: str  # the legend label
    path: Path
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class Curve:
    label: str
    steps: list[float]
    values: list[float]
    raw: list[float] | None = None  # the values before smoothing (drawn faintly), when smoothed


@dataclass
class Panel:
    """One PNG. ``kind`` "lines": curves over steps; "bars": mean seconds per phase (curves hold one
    value per run in ``values``, phases in ``categories``)."""

    name: str
    title: str
    ylabel: str
    curves: list[Curve] = field(default_factory=list)
    kind: str = "lines"
    categories: list[str] = field(default_factory=list)


# Figure name -> (title, y label, keys). Each key a run has is one curve; online and offline runs
# report different keys for the same idea (policy loss vs loss, eval reward vs eval accuracy).
LINE_FIGURES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reward": ("Reward (mean over the step's samples)", "reward", ("reward/mean",)),
    "kl": ("KL to the reference policy", "KL", ("train/kl", "kl/mean")),
    "length": ("Completion length", "tokens", ("response_length/mean",)),
    "loss": ("Training loss", "loss", ("train/policy_loss", "train/loss")),
    "eval": ("Held-out evaluation", "value", ("eval/reward/mean", "eval/accuracy", "eval/loss")),
}
STEP_TIME = "time/step"
BREAKDOWN = "step_time"


def load_run(path: str | Path, name: str | None = None) -> Run:
    """The rows of ``path/metrics.jsonl``; a clear error when ``path`` is not a run directory."""
    p = Path(path)
    if not p.is_dir():
        raise PlotError(f"{path}: not a directory; give a run directory written by `fleetrl train` "
                        "(run.output_dir/<run name>, the one holding metrics.jsonl)")
    f = p / "metrics.jsonl"
    if not f.is_file():
        raise PlotError(f"{path}: not a run directory (no metrics.jsonl in it); give the directory "
                        "`fleetrl train` printed at the end (run.output_dir/<run name>)")
    rows = []
    for i, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{f}:{i}: not a JSON object ({e.msg}); was the file edited or cut "
                            "mid-write? Delete that line and plot again") from None
        if not isinstance(row, dict) or "step" not in row:
            raise PlotError(f"{f}:{i}: every metrics row is a JSON object with a 'step'")
        rows.append(row)
    return Run(name or p.resolve().name, p, rows)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the rows that have a finite number for it. A key written twice
    for one step (a resumed run re-writes its rows) keeps the last value."""
    by_step: dict[float, float] = {}
    for row in rows:
        v, s = _number(row.get(key)), _number(row.get("step"))
        if v is not None and s is not None:
            by_step[s] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the first points average what they have)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plan(runs: list[Run], smooth_window: int = 0) -> tuple[list[Panel], list[str]]:
    """Every figure with data, and notes naming what each run lacks (figures with no data at all are
    left out, with a note)."""
    panels, notes = [], []
    for name, (title, ylabel, keys) in LINE_FIGURES.items():
        panel = Panel(name, title, ylabel)
        for run in runs:
            found = False
            for key in keys:
                steps, values = series(run.rows, key)
                if not steps:
                    continue
                found = True
                label = run.name if len(keys) == 1 else f"{run.name}: {key}"
                panel.curves.append(Curve(label, steps, smooth(values, smooth_window),
                                          raw=values if smooth_window > 1 else None))
            if not found:
                notes.append(f"{run.name}: no {' / '.join(keys)} in metrics.jsonl; its {name} curve is skipped")
        if panel.curves:
            panels.append(panel)
        else:
            notes.append(f"no run has {' / '.join(keys)}: {name}.png not written")
    panels.extend(_time_panels(runs, notes))
    return panels, notes


def _time_panels(runs: list[Run], notes: list[str]) -> list[Panel]:
    """time/step over steps, and per run the mean seconds per step of the whole step and of each phase
    (time/*) as grouped bars. Phases of an asynchronous step overlap, so they are not stacked; a phase
    that runs every N steps (eval) counts 0 in the others."""
    total = Panel("step_time_curve", "Step time", "seconds")
    bars = Panel(BREAKDOWN, "Step-time breakdown (mean seconds per step)", "seconds", kind="bars")
    phases = sorted({k for run in runs for row in run.rows for k in row
                     if k.startswith("time/") and k != STEP_TIME})
    keys = [STEP_TIME, *phases]
    bars.categories = ["step (total)", *(p.removeprefix("time/") for p in phases)]
    for run in runs:
        steps, values = series(run.rows, STEP_TIME)
        if steps:
            total.curves.append(Curve(run.name, steps, values))
        # Training steps only: the row of step 0 holds the evaluation before any update.
        trained = [r for r in run.rows if (_number(r.get("step")) or 0) > 0]
        n = len({r["step"] for r in trained})
        means = [sum(series(trained, key)[1]) / n if n else 0.0 for key in keys]
        if any(means):
            bars.curves.append(Curve(run.name, list(range(len(keys))), means))
        else:
            notes.append(f"{run.name}: no time/* keys in metrics.jsonl; its step-time breakdown is skipped")
    return [p for p in (total, bars) if p.curves]


def draw(panel: Panel):
    """One planned panel as a matplotlib Figure (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    if panel.kind == "bars":
        n = len(panel.curves)
        width = 0.8 / n
        for i, c in enumerate(panel.curves):
            ax.bar([x + (i - (n - 1) / 2) * width for x in c.steps], c.values, width, label=c.label)
        ax.set_xticks(range(len(panel.categories)), panel.categories, rotation=30, ha="right", fontsize=8)
    else:
        for c in panel.curves:
            line, = ax.plot(c.steps, c.values, label=c.label, linewidth=1.5,
                            marker="o" if len(c.steps) < 3 else None)
            if c.raw is not None:  # underscore labels stay out of the legend
                ax.plot(c.steps, c.raw, label=f"_raw {c.label}", color=line.get_color(), alpha=0.3, linewidth=1)
        ax.set_xlabel("step")
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(paths: list[str | Path], out_dir: str | Path, smooth_window: int = 0) -> tuple[list[Path], list[str]]:
    """Write one PNG per figure into ``out_dir``; returns the files written and the notes."""
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same directory name in different places: label by path
        for r in runs:
            r.name = str(r.path)
    panels, notes = plan(runs, smooth_window)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        f = out / f"{panel.name}.png"
        draw(panel).savefig(f)
        written.append(f)
    return written, notes
