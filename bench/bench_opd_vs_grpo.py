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
- target = f x teacher reward, for each f of ``--target-fractions`` (0.9 is the headline);
- steps to target = the first step s >= window whose trailing mean of ``reward/mean`` over steps
  s-window+1 .. s is >= target ("not reached" if none);
- ratio = GRPO steps to target / OPD steps to target (> 1: OPD needs fewer steps).

Each seed of ``--seeds`` repeats all three runs (``run.seed``: data order and sampling; the tiny
model's initial weights are the same), since one tiny run's reward curve is noisy.

Also per run: the median ``time/step`` over steps 2.. (step 1 pays one-off costs), and for OPD the
median ``time/teacher`` and ``time/teacher_share`` (the teacher's share of the step time).

``--task sums`` runs the same comparison on the real model (``model.path: smollm2-135m``) and the
two-number sums task: GRPO (``examples/grpo_smollm2.yaml``) makes the teacher from SmolLM2, then OPD
(``examples/opd_smollm2.yaml``) distils it back into the original SmolLM2. The measure there is the
held-out greedy accuracy (``eval/reward/mean``, 64 prompts never trained on, measured before the first
step and every ``rl.eval_every`` steps): teacher accuracy = GRPO's last evaluation; steps to target =
the first evaluated step whose accuracy is >= f x teacher accuracy, for GRPO and OPD alike. No online
DPO run. About an hour on 2 cores (~30 s a step each).

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
    p.add_argument("--task", choices=["letters", "sums"], default="letters",
                   help="letters: the tiny model (3 runs per seed); sums: SmolLM2 on held-out accuracy (GRPO, OPD)")
    p.add_argument("--eval-every", type=int, default=5, help="--task sums: rl.eval_every of both runs")
    p.add_argument("--grpo-steps", type=int, default=None,
                   help="steps of the GRPO run that makes the teacher (default: 80 letters, 30 sums)")
    p.add_argument("--opd-steps", type=int, default=None, help="steps of the OPD run (default: as --grpo-steps)")
    p.add_argument("--online-dpo-steps", type=int, default=40, help="steps of the online DPO run (0: skip it)")
    p.add_argument("--window", type=int, default=5, help="steps in the trailing mean of reward/mean")
    p.add_argument("--target-fractions", type=float, nargs="+", default=[0.6, 0.75, 0.9],
                   help="targets = these fractions of the teacher's final mean reward")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run.seed of the runs: GRPO, OPD and online DPO once per seed (default: 0 1 letters, 0 sums)")
    p.add_argument("--output-dir", default=None, help="run.output_dir (default: a temporary directory, removed)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN_DIR",
                   help="analyze these run directories instead of running: GRPO, OPD and (with "
                        "--online-dpo-steps > 0) online DPO, per seed of --seeds in turn")
    args = p.parse_args(argv)
    sums = args.task == "sums"
    if sums:
        args.online_dpo_steps = 0  # the real-model comparison is GRPO vs OPD only
    args.grpo_steps = args.grpo_steps or (30 if sums else 80)
    args.opd_steps = args.opd_steps or args.grpo_steps
    args.seeds = args.seeds or ([0] if sums else [0, 1])
    if args.grpo_steps < args.window or args.opd_steps < args.window:
        p.error(f"--grpo-steps and --opd-steps must be >= --window ({args.window})")
    if args.online_dpo_steps and args.online_dpo_steps < 2 * args.window:
        p.error(f"--online-dpo-steps must be 0 or >= 2 x --window ({2 * args.window}): its first and last "
                "window steps are compared")
    if not all(0 < f <= 1 for f in args.target_fractions):
        p.error(f"--target-fractions must be in (0, 1], got {args.target_fractions}")
    per_seed = 3 if args.online_dpo_steps else 2
    if args.runs and len(args.runs) != per_seed * len(args.seeds):
        p.error(f"--runs takes {per_seed} run directories per seed of --seeds ({len(args.seeds)}), "
                f"got {len(args.runs)}")
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
    rows = read_metrics_all(run_dir)
    if len(rows) < 2:
        raise ValueError(f"{run_dir}/metrics.jsonl has {len(rows)} steps; need at least 2")
    return rows


# ----------------------------------------------------------------------------- runs


def eval_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, eval/reward/mean) of the rows that carry an evaluation (step 0: before any update)."""
    return [(int(r["step"]), float(r["eval/reward/mean"])) for r in rows if "eval/reward/mean" in r]


def eval_steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose held-out accuracy is >= target; None if none."""
    return next((step for step, acc in curve if acc >= target), None)


def report_sums(args, runs: dict[int, dict[str, tuple[Path, float]]], load: str) -> None:
    """--task sums: held-out accuracy of GRPO (the teacher's run) and OPD, steps to f x the teacher's."""
    from _util import print_table

    per_run, targets, curves = [], [], []
    for seed, r in runs.items():
        every = {k: read_metrics_all(d) for k, (d, _) in r.items()}
        rows = {k: [m for m in ms if m.get("step", 0) > 0] for k, ms in every.items()}
        evals = {k: eval_curve(ms) for k, ms in every.items()}
        if any(len(c) < 2 for c in evals.values()):
            raise ValueError(f"seed {seed}: each run needs held-out evaluations (rl.eval_every, data.eval_path)")
        teacher = evals["grpo"][-1][1]
        for k in ("grpo", "opd"):
            share = "-"
            if k == "opd":
                share = (f"{median(m['time/teacher'] for m in rows[k][1:]):.3f} / "
                         f"{median(m['time/teacher_share'] for m in rows[k][1:]):.0%}")
            per_run.append([str(seed), k, str(len(rows[k])), f"{evals[k][0][1]:.3f} -> {evals[k][-1][1]:.3f}",
                            f"{median(m['time/step'] for m in rows[k][1:]):.2f}", share, f"{r[k][1]:.0f}"])
            curves.append(f"seed {seed} {k} held-out accuracy by step: "
                          + " ".join(f"{s}:{a:.3f}" for s, a in evals[k]))
        kl = [m["distill/reverse_kl"] for m in rows["opd"]]
        curves.append(f"seed {seed} opd distill/reverse_kl first -> last: {kl[0]:.4f} -> {kl[-1]:.4f}")
        for f in args.target_fractions:
            target = f * teacher
            n = {k: eval_steps_to_target(evals[k], target) for k in ("grpo", "opd")}
            cells = [str(seed), f"{teacher:.3f}", f"{f:g} -> {target:.3f}"]
            cells += [str(n[k]) if n[k] is not None else f"not in {evals[k][-1][0]}" for k in ("grpo", "opd")]
            cells.append(f"{n['grpo'] / n['opd']:.2f}" if n["grpo"] and n["opd"] else "n/a")
            targets.append(cells)
    print_table(["seed", "run", "steps", "held-out accuracy first -> last", "median s/step",
                 "median time/teacher s / share", "run wall s"], per_run,
                title=f"Runs on the sums task (SmolLM2-135M, 2 cores; {load})")
    print_table(["seed", "teacher accuracy", "fraction -> target", "grpo steps to target",
                 "opd steps to target", "GRPO / OPD steps"], targets,
                title=(f"Steps to a held-out accuracy (teacher accuracy = GRPO's last evaluation; evaluated "
                       f"every {args.eval_every} steps, so a step count is a multiple of that)"))
    for line in curves:
        print(line)


def read_metrics_all(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


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


def first_last(rows: list[dict], w: int) -> str:
    return (f"{sum(r['reward/mean'] for r in rows[:w]) / w:.3f} -> "
            f"{sum(r['reward/mean'] for r in rows[-w:]) / w:.3f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    from _util import init_local_ray, print_machine_state, print_table

    before = print_machine_state("start")
    out = args.output_dir or tempfile.mkdtemp(prefix="fleetrl-bench-opd-")
    nan = float("nan")
    runs: dict[int, dict[str, tuple[Path, float]]] = {}
    if args.runs:
        given = iter(Path(d) for d in args.runs)
        for seed in args.seeds:
            kinds = ("grpo", "opd", "online_dpo") if args.online_dpo_steps else ("grpo", "opd")
            runs[seed] = {k: (next(given), nan) for k in kinds}
    else:
        init_local_ray()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        grpo_yaml, opd_yaml, extra = "grpo_tiny.yaml", "opd_tiny.yaml", []
        if args.task == "sums":
            grpo_yaml, opd_yaml, extra = "grpo_smollm2.yaml", "opd_smollm2.yaml", [f"rl.eval_every={args.eval_every}"]
        for seed in args.seeds:
            r = runs[seed] = {}
            r["grpo"] = run_one(grpo_yaml, f"grpo-s{seed}-{stamp}", args.grpo_steps, out, seed, extra)
            r["opd"] = run_one(opd_yaml, f"opd-s{seed}-{stamp}", args.opd_steps, out, seed,
                               [f"teacher.model_path={r['grpo'][0] / 'final_model'}", *extra])
            if args.online_dpo_steps:
                r["online_dpo"] = run_one("online_dpo_tiny.yaml", f"online-dpo-s{seed}-{stamp}",
                                          args.online_dpo_steps, out, seed)
    after = print_machine_state("end")
    load = f"load avg start {before['loadavg_1_5_15']}, end {after['loadavg_1_5_15']}"
    if args.task == "sums":
        report_sums(args, runs, load)
        if not args.output_dir and not args.runs:
            shutil.rmtree(out, ignore_errors=True)
        return

    w = args.window
    names = {"grpo": "GRPO from scratch (the teacher)", "opd": "OPD from the fresh tiny model",
             "online_dpo": "online DPO from the fresh tiny model"}
    per_run, targets, curves = [], [], []
    for seed, r in runs.items():
        metrics = {k: read_metrics(d) for k, (d, _) in r.items()}
        teacher = sum(m["reward/mean"] for m in metrics["grpo"][-w:]) / w
        for k, rows in metrics.items():
            share = "-"
            if k == "opd":
                share = (f"{median(m['time/teacher'] for m in rows[1:]):.3f} / "
                         f"{median(m['time/teacher_share'] for m in rows[1:]):.0%}")
            per_run.append([str(seed), names[k], str(len(rows)), first_last(rows, w),
                            f"{median(m['time/step'] for m in rows[1:]):.2f}", share, f"{r[k][1]:.0f}"])
            curves.append(f"seed {seed} {k} reward/mean per step: "
                          + " ".join(f"{m['reward/mean']:.2f}" for m in rows))
        kl = [m["distill/reverse_kl"] for m in metrics["opd"]]
        curves.append(f"seed {seed} opd distill/reverse_kl first -> last: {kl[0]:.3f} -> {kl[-1]:.3f}")
        for f in args.target_fractions:
            target = f * teacher
            n = {k: steps_to_target([m["reward/mean"] for m in rows], target, w) for k, rows in metrics.items()}
            cells = [str(seed), f"{teacher:.3f}", f"{f:g} -> {target:.3f}"]
            cells += [str(n[k]) if n[k] is not None else f"not in {len(metrics[k])}" for k in metrics]
            cells.append(f"{n['grpo'] / n['opd']:.2f}" if n["grpo"] and n["opd"] else "n/a")
            targets.append(cells)
    print_table(["seed", "run", "steps", f"reward/mean first {w} -> last {w}", "median s/step",
                 "median time/teacher s / share", "run wall s"], per_run,
                title=f"Runs on the letters task (tiny model, 2 cores; {load})")
    print_table(["seed", "teacher reward", "fraction -> target"]
                + [f"{k} steps to target" for k in next(iter(runs.values()))] + ["GRPO / OPD steps"], targets,
                title=(f"Steps to a target reward (teacher reward = mean reward/mean of GRPO's last {w} steps; "
                       f"steps to target = first step whose trailing mean over {w} steps >= target)"))
    for line in curves:
        print(line)
    if not args.output_dir and not args.runs:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
