"""Asynchronous vs synchronous GRPO on equal resources, measured in one run.

Runs the same workload (``examples/grpo_tiny.yaml`` with one rollout worker, one learner rank)
twice per seed: ``rl.max_staleness=0`` (synchronous: the fleet waits while the learner trains and
syncs, the learner waits while the fleet generates) and ``rl.max_staleness=K`` (the fleet keeps
generating for the coming steps while the learner trains). On this 2-core machine the rollout
worker's processes are pinned to core 0 and the learner's to core 1 (``taskset``, re-applied
every second to processes by name), which is what separate GPUs are on a cluster; the driver,
the reward actor and Ray's own processes float.

Reported per mode: samples/s (trained samples over the summed step times, the first step
excluded: it pays one-off costs), the share of step time each service was busy (learner: train +
proximal + reference passes; fleet: 1 - time/fleet_idle / step, where fleet_idle is time with no
generation in flight while the learner trained), staleness, and the reward curve against
samples consumed. The ratio async / sync is the figure of merit.

Run from the repository root:  python bench/bench_async.py  (see --help)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "grpo_tiny.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--staleness", type=int, default=2, help="K of the asynchronous mode")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for both modes")
    p.add_argument("--no-pin", action="store_true", help="do not pin the services to cores")
    return p.parse_args(argv)


class Pinner:
    """Pins processes by name to a core with ``taskset -a`` (all threads), every second."""

    RULES = (("VLLM::", "0"), ("ray::RolloutWor", "0"), ("ray::Learner", "1"))

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, _, cmd = line.strip().partition(" ")
                for prefix, core in self.RULES:
                    if cmd.startswith(prefix):
                        # Threads appear over time (OpenMP pools): pin all of them again each round.
                        subprocess.run(["taskset", "-a", "-cp", core, pid], capture_output=True)


def run_mode(args, k: int, seed: int, out: str) -> list[dict]:
    from fleetrl.run.config import load_config
    from fleetrl.train import train

    overrides = [f"run.steps={args.steps}", f"run.output_dir={out}", f"run.name=async-k{k}-s{seed}",
                 f"run.seed={seed}", f"rl.max_staleness={k}", "rollout.num_workers=1", "learner.num_ranks=1",
                 "run.tensorboard=false", *args.overrides]
    print(f"running {args.config} with {' '.join(overrides)}", flush=True)
    run_dir = train(load_config(args.config, overrides), config_path=args.config)
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def summarize(rows: list[dict], samples_per_step: int) -> dict:
    steady = [r for r in rows if r["step"] > 1]
    total = sum(r["time/step"] for r in steady)
    learner = sum(r["time/train"] + r.get("time/proximal", 0.0) + r.get("time/reference", 0.0) for r in steady)
    idle = sum(r.get("time/fleet_idle", 0.0) + r.get("time/weight_sync", 0.0) for r in steady)
    return {
        "samples_per_s": samples_per_step * len(steady) / total,
        "learner_busy": learner / total,
        "fleet_busy": 1.0 - idle / total,
        "staleness_mean": sum(r.get("staleness/mean", 0.0) for r in steady) / len(steady),
        "dropped": sum(r.get("groups/dropped_stale", 0) for r in steady),
        "in_flight_updates": sum(r.get("rollout/in_flight_updates", 0) for r in steady),
        "rewards": [r["reward/mean"] for r in rows],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from _util import print_machine_state, print_table
    from fleetrl.run.config import load_config

    cfg = load_config(args.config, args.overrides)
    per_step = cfg.rl.prompts_per_step * cfg.rl.group_size
    before = print_machine_state("start")
    out = tempfile.mkdtemp(prefix="fleetrl-bench-async-")
    results: dict[tuple[int, int], dict] = {}
    try:
        for seed in args.seeds:
            for k in (0, args.staleness):  # the same seed back to back, sync first
                if args.no_pin:
                    rows = run_mode(args, k, seed, out)
                else:
                    with Pinner():
                        rows = run_mode(args, k, seed, out)
                results[(k, seed)] = summarize(rows, per_step)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    after = print_machine_state("end")

    table = []
    for (k, seed), s in results.items():
        sync = results[(0, seed)]
        ratio = s["samples_per_s"] / sync["samples_per_s"]
        table.append([f"{k}", f"{seed}", f"{s['samples_per_s']:.1f}", f"{ratio:.2f}",
                      f"{s['learner_busy']:.0%}", f"{s['fleet_busy']:.0%}", f"{s['staleness_mean']:.2f}",
                      f"{s['dropped']}", f"{s['in_flight_updates']}"])
    print_table(["max_staleness", "seed", "samples/s", "vs sync", "learner busy", "fleet busy",
                 "staleness mean", "groups dropped", "samples updated in flight"], table,
                title=(f"GRPO {args.config}, {args.steps} steps x {per_step} samples, 1 rollout worker"
                       f"{'' if args.no_pin else ' (core 0)'}, 1 learner rank{'' if args.no_pin else ' (core 1)'}; "
                       f"load avg start {before['loadavg_1_5_15']}, end {after['loadavg_1_5_15']}"))
    # Reward against samples consumed, every 5 steps, per mode and seed.
    marks = list(range(0, args.steps, 5)) + [args.steps - 1]
    curve = []
    for (k, seed), s in results.items():
        curve.append([f"K={k} seed {seed}"] + [f"{s['rewards'][i]:.3f}" for i in marks])
    print_table(["mode"] + [f"{(i + 1) * per_step} samples" for i in marks], curve,
                title="reward/mean against samples consumed")


if __name__ == "__main__":
    main()
