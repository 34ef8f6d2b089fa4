"""Steering a running job from outside: a small named Ray actor per run.

The training loop owns the services; this actor only holds what was asked (the fleet size) and
what the loop last reported, so ``fleetrl scale`` / ``fleetrl`` clients never touch the loop's
state directly. The loop reads the request between steps, where changing the fleet is safe.
"""

from __future__ import annotations

import time
from typing import Any

CONTROL_ACTOR = "orchestrator"
CONTROL_TIMEOUT_S = 60.0  # the actor only holds a few numbers: past this, Ray or its node is in trouble


def control_actor_name(actor_prefix: str) -> str:
    """``<run name>/orchestrator``: the run's actors share its prefix in the Ray namespace."""
    return f"{actor_prefix}{CONTROL_ACTOR}"


class RunControl:
    """Requested fleet size + the loop's last status report. Plain class; Ray wraps it."""

    def __init__(self, rollout_workers: int):
        self._target = rollout_workers
        self._status: dict[str, Any] = {"rollout_workers": rollout_workers, "step": 0}
        self._requests: list[tuple[float, int]] = []
        self._stop = False

    def request_rollout_workers(self, n: int) -> dict[str, Any]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"rollout workers must be a whole number >= 1, got {n!r}")
        self._target = n
        self._requests.append((time.time(), n))
        return self.status()

    def target_rollout_workers(self) -> int:
        return self._target

    def request_stop(self) -> dict[str, Any]:
        """Finish the current step, checkpoint, write the final model, and end the run."""
        self._stop = True
        return self.status()

    def poll(self) -> tuple[int, bool]:
        """What the loop reads between steps: (wanted fleet size, stop requested)."""
        return self._target, self._stop

    def report(self, **status: Any) -> None:
        self._status.update(status)

    def status(self) -> dict[str, Any]:
        return {**self._status, "target_rollout_workers": self._target, "stop_requested": self._stop}


def start_control_actor(actor_prefix: str, rollout_workers: int):
    import ray

    return (
        ray.remote(RunControl)
        .options(name=control_actor_name(actor_prefix), num_cpus=0)
        .remote(rollout_workers)
    )


def poll_control(control, timeout_s: float = CONTROL_TIMEOUT_S) -> tuple[int, bool]:
    """(wanted fleet size, stop requested) from the run's control actor, within ``timeout_s``."""
    from fleetrl.core.waits import wait_all

    return wait_all([control.poll.remote()], ["the run's control actor (orchestrator)"], timeout_s,
                    "reading `fleetrl scale` / stop requests between steps",
                    "that actor holds a few numbers only, so its node is lost or Ray is overloaded: "
                    "check `ray status` and the Ray dashboard")[0]


def scale_run(run_name: str, rollout_workers: int, address: str | None, namespace: str,
              wait_s: float = 600.0, poll_s: float = 2.0) -> dict[str, Any]:
    """Ask run ``run_name`` for ``rollout_workers`` workers; wait until the loop reports it applied."""
    import os

    import ray

    if not ray.is_initialized():
        if not address and not os.environ.get("RAY_ADDRESS"):
            raise RuntimeError("no Ray cluster to reach: pass --address (e.g. 127.0.0.1:6379) or set "
                               "RAY_ADDRESS")
        ray.init(address=address or None, namespace=namespace, log_to_driver=False)
    name = control_actor_name(run_name + "/")
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise RuntimeError(
            f"no running fleetrl run named {run_name!r} in Ray namespace {namespace!r} (looked for actor "
            f"{name!r}); the run name is the last part of its run directory, e.g. runs/<name>"
        ) from None
    ray.get(actor.request_rollout_workers.remote(rollout_workers), timeout=CONTROL_TIMEOUT_S)
    deadline = time.time() + wait_s
    while True:
        status = ray.get(actor.status.remote(), timeout=CONTROL_TIMEOUT_S)
        if status.get("rollout_workers") == rollout_workers or time.time() > deadline:
            return status
        time.sleep(poll_s)
