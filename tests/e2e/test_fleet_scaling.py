"""A running asynchronous GRPO job (rl.max_staleness=2) grows its fleet 1 -> 2, loses a worker, and
shrinks back to 1.

No prompt is lost or trained twice (those in flight when the job stopped are in its last
checkpoint), and no sample (the new worker's first ones included) lags the learner by more than 2.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import ray

from fleetrl.online.control import control_actor_name, scale_run
from fleetrl.run.config import load_config
from fleetrl.train import train

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"
RUN = "scaling"
K = 2


def wait_for(pred, what: str, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def test_grow_lose_and_shrink_a_running_fleet(tmp_path, ray_local):
    cfg = load_config(EXAMPLE, [f"run.output_dir={tmp_path}", f"run.name={RUN}", "run.steps=1000",
                                "run.log_samples=true", "rollout.num_workers=1", "rl.prompts_per_step=4",
                                f"rl.max_staleness={K}"])
    result: dict = {}

    def run():
        try:
            result["run_dir"] = train(cfg, config_path=EXAMPLE)
        except BaseException as e:  # surfaced by the main thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    namespace = ray.get_runtime_context().namespace
    control = wait_for(lambda: _actor(control_actor_name(RUN + "/"), namespace), "control actor", 300)

    def step() -> int:
        if "error" in result:
            raise result["error"]
        return ray.get(control.status.remote())["step"]

    wait_for(lambda: step() >= 2, "two steps")
    assert scale_run(RUN, 2, None, namespace)["rollout_workers"] == 2
    grown_at = step()

    # A worker dies mid-run: its prompts go to the other one, and it is replaced between steps.
    wait_for(lambda: step() >= grown_at + 2, "steps on two workers")
    ray.kill(ray.get_actor(f"{RUN}/rollout-1", namespace=namespace))
    lost_at = step()
    wait_for(lambda: step() >= lost_at + 3, "steps after losing a worker")

    assert scale_run(RUN, 1, None, namespace)["rollout_workers"] == 1
    shrunk_at = step()
    wait_for(lambda: step() >= shrunk_at + 2, "steps after shrinking")
    ray.get(control.request_stop.remote())
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")

    run_dir = result["run_dir"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    workers = [r["rollout/num_workers"] for r in rows]
    assert workers[0] == 1 and 2 in workers and workers[-1] == 1, workers
    assert rows[-1]["rollout/workers_lost"] >= 1

    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    trained = [s["prompt_index"] for s in samples if s["completion"] is not None]
    per_prompt = {}
    for s in samples:
        per_prompt.setdefault(s["prompt_index"], set()).add(s["step"])
    # Each prompt trained in exactly one step; with the prompts started but not trained when the job
    # stopped (its last checkpoint), they are every prompt the job started, none missing.
    assert all(len(steps) == 1 for steps in per_prompt.values())
    assert len(per_prompt) == len(rows) * 4
    assert len(trained) == len(rows) * 4 * cfg.rl.group_size
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = json.loads((last / "collector.json").read_text())
    pending = {i for i, _row in state["pending"]}
    assert not pending & set(per_prompt)
    assert pending | set(per_prompt) == set(range(state["prompts_submitted"]))
    # Step k trains with the learner at version k - 1: no sample is more than K versions older.
    assert all(0 <= s["step"] - 1 - s["weight_version"] <= K for s in samples)
    assert {s["worker"] for s in samples} >= {0, 1, 2}  # worker 2 replaced the one that died


def _actor(name: str, namespace: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
