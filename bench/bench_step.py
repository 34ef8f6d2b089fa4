"""Where the time of one online RL step goes: the step-time breakdown of a real short run.

Runs ``fleetrl.train.train`` (what ``fleetrl train`` runs) on a config, by default
``examples/grpo_tiny.yaml`` for a few steps, then reads the run's ``metrics.jsonl``. For each
phase the orchestrator times (``time/generate``, ``time/reward_wait``, ``time/reference``,
``time/train``, ``time/weight_sync``; ``time/reward``, which overlaps generation, is shown apart)
it prints the median over the steps after the first (the first step pays one-off costs), min-max,
and the phase's share of the median step (``time/step``, the baseline of the same run). "other" is
the step minus its timed phases (padding, advantages, metrics). ``--metrics`` reads an existing
metrics.jsonl instead.

Run from the repository root:  python bench/bench_step.py  (see --help)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Back to back inside a step: together with "other" they add up to time/step.
PHASES = ("time/generate", "time/reward_wait", "time/reference", "time/train", "time/weight_sync")
# Measured too, but overlapping the phases above: shown, never subtracted.
OVERLAPPING = {"time/reward": "reward scoring, summed over reward actors (overlaps generate)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "grpo_tiny.yaml"))
    p.add_argument("--steps", type=int, default=20, help="run.steps of the run (the first is not counted)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides, as on the fleetrl command line "
                        "(e.g. learner.loss.kl_coef=0.01)")
    p.add_argument("--output-dir", default=None,
                   help="run.output_dir (default: a temporary directory, removed)")
    p.add_argument("--metrics", default=None, help="analyze this metrics.jsonl instead of running")
    return p.parse_args(argv)


def breakdown(rows: list[dict]) -> tuple[list[list[str]], dict]:
    """Table rows (phase, median, min-max, share of the median step) over rows[1:]."""
    from _util import Samples

    if len(rows) < 2:
        raise ValueError(f"need at least 2 steps in metrics.jsonl (the first is skipped), got {len(rows)}")
    steady = rows[1:]
    step = Samples(r["time/step"] for r in steady)
    cols = {k: Samples(r.get(k, 0.0) for r in steady) for k in PHASES}
    cols["other"] = Samples(r["time/step"] - sum(r.get(k, 0.0) for k in PHASES) for r in steady)
    table = []
    for name, s in list(cols.items()) + [("time/step", step)]:
        table.append([name, f"{s.median:.3f}", f"{min(s.values):.3f}-{max(s.values):.3f}",
                      f"{s.median / step.median:.0%}"])
    for name, what in OVERLAPPING.items():
        if all(name in r for r in steady):
            s = Samples(r[name] for r in steady)
            table.append([f"{name}: {what}", f"{s.median:.3f}", f"{min(s.values):.3f}-{max(s.values):.3f}",
                          f"({s.median / step.median:.0%})"])
    extra = {
        "steps counted": len(steady),
        "tokens/s (median, during generate)": f"{Samples(r['tokens_per_s'] for r in steady).median:.0f}",
        "reward/mean first -> last": f"{rows[0]['reward/mean']:.3f} -> {rows[-1]['reward/mean']:.3f}",
        "first step s": f"{rows[0]['time/step']:.2f}",
    }
    return table, extra


def run(args) -> Path:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from fleetrl.run.config import load_config
    from fleetrl.train import train

    out = args.output_dir or tempfile.mkdtemp(prefix="fleetrl-bench-step-")
    overrides = [f"run.steps={args.steps}", f"run.output_dir={out}",
                 f"run.name=bench-step-{time.strftime('%Y%m%d-%H%M%S')}", *args.overrides]
    cfg = load_config(args.config, overrides)
    print(f"running {args.config} with {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    run_dir = train(cfg, config_path=args.config)
    print(f"run finished in {time.perf_counter() - t0:.1f}s (incl. service start-up and saving)", flush=True)
    return Path(run_dir) / "metrics.jsonl"


def main(argv=None) -> None:
    args = parse_args(argv)
    from _util import print_machine_state, print_table

    before = print_machine_state("start")
    metrics = Path(args.metrics) if args.metrics else run(args)
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    table, extra = breakdown(rows)
    after = print_machine_state("end")
    if not args.metrics and not args.output_dir:
        shutil.rmtree(metrics.parent.parent, ignore_errors=True)
    shown_overrides = " " + " ".join(args.overrides) if args.overrides and not args.metrics else ""
    print_table(["phase", "median s", "min-max s", "share of median step"], table,
                title=(f"Step-time breakdown of {args.metrics or args.config}{shown_overrides} "
                       f"({len(rows)} steps; load avg start {before['loadavg_1_5_15']}, "
                       f"end {after['loadavg_1_5_15']})"))
    for k, v in extra.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
