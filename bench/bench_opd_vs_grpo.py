"""On-policy distillation vs GRPO from scratch: steps to the teacher's reward on the letters task.

Three real ``fleetrl.train.train`` runs (what ``fleetrl train`` runs) on the built-in tiny model, one
after the other in one local Ray:

1. **GRPO from scratch** (``examples/grpo_tiny.yaml``, ``--grpo-steps``). Its ``final_model`` is the
   teacher, and its reward curve is the GRPO baseline.
2. **OPD** (``examples/opd_tiny.yaml``, ``--opd-steps``): a fresh student (the same built-in tiny
   model GRPO started from, so the same tokenizer and the same initial weights) distilled from that
   teacher; pure distillation (``opd.reward_weight: 0``), the task reward only reported.
3. **Online DPO** (``examples/online_dpo_tiny.yaml``, ``--online-dpo-steps``) from the same tiny
   model: whether its reward rises.

From each run's ``metrics.jsonl`` (``reward/mean``: the mean task reward of the step's samples, at
the sampling temperature of the run):

- teacher reward = the mean of GRPO's last ``--window`` steps' ``reward/mean``;
- target = ``--target-fraction`` x teacher reward;
- steps to target = the first step s >= window whose trailing mean of ``reward/mean`` over steps
  s-window+1 .. s is >= target ("not reached" if none);
- ratio = GRPO steps to target / OPD steps to target (> 1: OPD needs fewer steps).

Also per run: the median ``time/step`` over steps 2.. (step 1 pays one-off costs), and for OPD the
median ``time/teacher`` and ``time/teacher_share`` (the teacher's share of the step time).

Run from the repository root:  python bench/bench_opd_vs_grpo.py  (see --help)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grpo-steps", type=int, default=80, help="steps of the GRPO run that makes the teacher")
    p.add_argument("--opd-steps", type=int, default=40, help="steps of the OPD run")
    p.add_argument("--online-dpo-steps", type=int, default=40, help="steps of the online DPO run (0: skip it)")
    p.add_argument("--window", type=int, default=5, help="steps in the trailing mean of reward/mean")
    p.add_argument("--target-fraction", type=float, default=0.9,
                   help="target = this fraction of the teacher's final mean reward")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every run")
    p.add_argument("--output-dir", default=None, help="run.output_dir (default: a temporary directory, removed)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                   help="analyze these run directories (GRPO, OPD[, online DPO]) instead of running")
    args = p.parse_args(argv)
    if args.grpo_steps < args.window or args.opd_steps < args.window:
        p.error(f"--grpo-steps and --opd-steps must be >= --window ({args.window})")
    if args.online_dpo_steps and args.online_dpo_steps < 2 * args.window:
        p.error(f"--online-dpo-steps must be 0 or >= 2 x --window ({2 * args.window}): its first and last "
                "window steps are compared")
    if not 0 < args.target_fraction <= 1:
        p.error(f"--target-fraction must be in (0, 1], got {args.target_fraction}")
    return args


# ----------------------------------------------------------------------------- analysis (no Ray)


def trailing_means(values: list[float], window: int) -> list[float]:
    """Trailing means: out[i] = mean(values[i-window+1 .. i]) for i >= window-1 (out[0] is step `window`)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]


def steps_to_target(rewards: list[float], target: float, window: int) -> int | None:
    """The first step (1-based) whose trailing mean over `window` steps is >= target; None if none."""
    for i, m in enumerate(trailing_means(rewards, window)):
        if m >= target:
            return i + window
    return None


def median(xs) -> float:
    from _util import Samples

    return Samples(xs).median


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    if len(rows) < 2:
        raise ValueError(f"{run_dir}/metrics.jsonl has {len(rows)} steps; need at least 2")
    return rows


# ----------------------------------------------------------------------------- runs


def run_one(example: str, name: str, steps: int, out: str, seed: int, extra=()) -> tuple[Path, float]:
    from fleetrl.run.config import load_config
    from fleetrl.train import train

    config = EXAMPLES / example
    overrides = [f"run.steps={steps}", f"run.output_dir={out}", f"run.name={name}", f"run.seed={seed}", *extra]
    print(f"running {config.name} with {' '.join(overrides)}", flush=True)
    t0 = time.perf_counter()
    run_dir = Path(train(load_config(config, overrides), config_path=config))
    wall = time.perf_counter() - t0
    print(f"{name} finished in {wall:.1f}s (incl. service start-up and saving)", flush=True)
    return run_dir, wall


def main(argv=None) -> None:
    args = parse_args(argv)
    from _util import init_local_ray, print_machine_state, print_table

    before = print_machine_state("start")
    out = args.output_dir or tempfile.mkdtemp(prefix="fleetrl-bench-opd-")
    if args.runs:
        if len(args.runs) not in (2, 3):
            raise SystemExit(f"--runs takes 2 or 3 run directories (GRPO, OPD[, online DPO]), got {len(args.runs)}")
        nan = float("nan")
        (grpo_dir, grpo_wall), (opd_dir, opd_wall) = (Path(args.runs[0]), nan), (Path(args.runs[1]), nan)
        odpo = (Path(args.runs[2]), nan) if len(args.runs) == 3 else None
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        init_local_ray()
        grpo_dir, grpo_wall = run_one("grpo_tiny.yaml", f"grpo-{stamp}", args.grpo_steps, out, args.seed)
        teacher = grpo_dir / "final_model"
        opd_dir, opd_wall = run_one("opd_tiny.yaml", f"opd-{stamp}", args.opd_steps, out, args.seed,
                                    [f"teacher.model_path={teacher}"])
        odpo = None
        if args.online_dpo_steps:
            odpo = run_one("online_dpo_tiny.yaml", f"online-dpo-{stamp}", args.online_dpo_steps, out, args.seed)

    grpo, opd = read_metrics(grpo_dir), read_metrics(opd_dir)
    w = args.window
    teacher_reward = sum(r["reward/mean"] for r in grpo[-w:]) / w
    target = args.target_fraction * teacher_reward
    n_grpo = steps_to_target([r["reward/mean"] for r in grpo], target, w)
    n_opd = steps_to_target([r["reward/mean"] for r in opd], target, w)
    after = print_machine_state("end")

    def fmt_steps(n, total):
        return str(n) if n is not None else f"not reached in {total}"

    def first_last(rows):
        return (f"{sum(r['reward/mean'] for r in rows[:w]) / w:.3f} -> "
                f"{sum(r['reward/mean'] for r in rows[-w:]) / w:.3f}")

    table = [
        ["GRPO from scratch (teacher)", str(len(grpo)), first_last(grpo), fmt_steps(n_grpo, len(grpo)),
         f"{median(r['time/step'] for r in grpo[1:]):.2f}", "-", f"{grpo_wall:.0f}"],
        ["OPD from the fresh tiny model", str(len(opd)), first_last(opd), fmt_steps(n_opd, len(opd)),
         f"{median(r['time/step'] for r in opd[1:]):.2f}",
         f"{median(r['time/teacher'] for r in opd[1:]):.3f} / {median(r['time/teacher_share'] for r in opd[1:]):.0%}",
         f"{opd_wall:.0f}"],
    ]
    if odpo is not None:
        rows = read_metrics(odpo[0])
        table.append(["online DPO from the fresh tiny model", str(len(rows)), first_last(rows),
                      fmt_steps(steps_to_target([r["reward/mean"] for r in rows], target, w), len(rows)),
                      f"{median(r['time/step'] for r in rows[1:]):.2f}", "-", f"{odpo[1]:.0f}"])
    print_table(["run", "steps", f"reward/mean first {w} -> last {w}", "steps to target", "median s/step",
                 "median time/teacher s / share", "run wall s"], table,
                title=(f"OPD vs GRPO on the letters task (teacher reward {teacher_reward:.3f} = mean of GRPO's "
                       f"last {w} steps; target {target:.3f} = {args.target_fraction:g} x teacher; trailing "
                       f"mean over {w} steps; seed {args.seed}; load avg start {before['loadavg_1_5_15']}, "
                       f"end {after['loadavg_1_5_15']})"))
    ratio = f"{n_grpo / n_opd:.2f}" if n_grpo is not None and n_opd is not None else "n/a (a run missed the target)"
    print(f"GRPO steps / OPD steps to the target: {ratio}")
    for name, rows in [("GRPO", grpo), ("OPD", opd)] + ([("online DPO", read_metrics(odpo[0]))] if odpo else []):
        print(f"{name} reward/mean per step: " + " ".join(f"{r['reward/mean']:.2f}" for r in rows))
    print("OPD distill/reverse_kl first -> last: "
          f"{opd[0]['distill/reverse_kl']:.3f} -> {opd[-1]['distill/reverse_kl']:.3f}")
    if not args.output_dir and not args.runs:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
