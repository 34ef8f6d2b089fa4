"""Weight sync: learner rank 0 -> every vLLM worker over a side group; growing or shrinking the
fleet between steps (which rebuilds that group)."""

from __future__ import annotations

import dataclasses
import time

import ray

from fleetrl.learner.group import LearnerGroup
from fleetrl.online.collect import GroupCollector
from fleetrl.rollout.fleet import RolloutFleet


class WeightSync:
    """Learner rank 0 -> every vLLM worker, over a side group; bumps the fleet's weight version."""

    def __init__(self, learner: LearnerGroup, fleet: RolloutFleet, backend: str):
        self.learner = learner
        self.fleet = fleet
        self.backend = backend
        self.version = 0
        self._plan = None
        self.connect()

    def connect(self) -> None:
        """(Re)build the side group; needed again whenever the fleet's membership changes."""
        host, port = self.learner.side_group_address()
        world = self.fleet.weight_group_world_size()
        self._wait("joining the weight-sync group", self.learner.init_weight_sync(host, port, world, self.backend),
                   self.fleet.init_weight_group(host, port, self.backend))
        self._members = tuple(self.fleet.indices())

    def _wait(self, what: str, learner_refs: list, fleet_refs: list) -> None:
        """Wait for both sides within rollout.weight_sync_timeout_s; a TimeoutError names who is late."""
        timeout = self.fleet.cfg.weight_sync_timeout_s
        names = {r: f"learner rank {i}" for i, r in enumerate(learner_refs)}
        names.update({r: f"rollout worker {i}" for i, r in zip(self.fleet.indices(), fleet_refs)})
        _, late = ray.wait(list(names), num_returns=len(names), timeout=timeout)
        if late:
            raise TimeoutError(
                f"weight sync ({what}) did not finish within rollout.weight_sync_timeout_s={timeout:.0f}s: "
                f"no answer from {', '.join(names[r] for r in late)}. A peer that stalls blocks the broadcast "
                "for everyone: check that process (the Ray dashboard names its actor), or raise the timeout "
                "for very large models")
        ray.get(list(names))  # raises a side's own error, if it failed

    def push(self, version: int) -> float:
        start = time.perf_counter()
        if tuple(self.fleet.indices()) != self._members:  # a worker died during the step
            self.connect()
        if self._plan is None:
            self._plan = self.learner.weight_plan(version)
        plan = dataclasses.replace(self._plan, version=version)
        self._wait(f"version {version}", self.learner.send_weights(plan), self.fleet.receive_weights(plan))
        self.version = version
        return time.perf_counter() - start


def resize_fleet(fleet: RolloutFleet, sync: WeightSync, collector: GroupCollector, target: int) -> None:
    """Grow or shrink the fleet between steps. Removed workers finish their calls first (nothing is
    lost); new workers load the current weights before they take a prompt."""
    if target == fleet.num_workers:
        return
    before = fleet.num_workers
    while fleet.num_workers > target:
        collector.requeue(fleet.remove_worker(max(fleet.indices()), wait=True))
    while fleet.num_workers < target:
        fleet.add_worker()
    fleet.wait_ready()
    sync.connect()
    sync.push(sync.version)
    print(f"fleetrl: rollout fleet {before} -> {fleet.num_workers} worker(s), "  # noqa: T201 (console progress)
          f"weights at version {sync.version}", flush=True)
