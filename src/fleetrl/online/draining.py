"""Nodes that are going away (preemption, scale-down): the fleet leaves them before they do.

A node is drained through Ray (``ray drain-node``, or the autoscaler / KubeRay before it removes a
node), which stops new actors landing there and gives a deadline. Between steps the loop asks Ray
which nodes are draining; each rollout worker on one stops taking prompts, gets until the deadline
(at most ``rollout.generate_timeout_s``) to finish its calls in flight, hands back the unfinished
ones (their prompts are generated again elsewhere: nothing is lost), and is removed. ``resize_fleet``
then starts its replacement on a node that is not draining. A learner rank on a draining node cannot
move: the step ends with a checkpoint, so the restart that follows the node's loss loses no step.
"""

from __future__ import annotations

import time
from typing import Any

from fleetrl.core.nodes import draining_nodes

# Seconds kept back from a node's drain deadline: the worker must be gone before the node is.
DEADLINE_MARGIN_S = 5.0


def drain_budget_s(deadline: float, timeout_s: float, now: float) -> float:
    """How long a leaving worker may finish its calls: until the node's deadline less a margin, never
    beyond ``timeout_s`` (a call older than that is hung anyway), never below 0."""
    if not deadline:
        return timeout_s
    return max(0.0, min(timeout_s, deadline - now - DEADLINE_MARGIN_S))


def leaving(node_of: dict[Any, str | None], draining: dict[str, float]) -> dict[Any, str]:
    """Which of ``node_of``'s actors (key -> the node id they run on) are on a draining node."""
    return {key: node for key, node in node_of.items() if node in draining}


def drain_leaving_workers(fleet, collector, draining: dict[str, float] | None = None) -> list[int]:
    """Remove every rollout worker on a draining node (their unfinished calls requeued); returns
    their indices. The caller grows the fleet back (``resize_fleet``) on the nodes that stay."""
    draining = draining_nodes() if draining is None else draining
    going = leaving({i: fleet.node_of(i) for i in fleet.indices()}, draining)
    for index, node in sorted(going.items()):
        budget = drain_budget_s(draining[node], fleet.cfg.generate_timeout_s, time.time())
        in_flight = fleet.inflight_of(index)
        unfinished = fleet.remove_worker(index, wait=True, timeout_s=budget)
        collector.requeue(unfinished)
        collector.workers_drained += 1
        print(f"fleetrl: node {node[:8]} is draining: rollout worker {index} left after finishing "  # noqa: T201
              f"{in_flight - len(unfinished)} of its {in_flight} generate call(s) (within {budget:.0f}s); "
              f"{len(unfinished)} handed back to the other workers", flush=True)
    return sorted(going)


def rank_nodes(*groups) -> dict[str, str | None]:
    """Actor name -> Ray node id of every rank of the given learner groups (None entries skipped)."""
    return {name: info.get("node_id") for group in groups if group is not None
            for name, info in zip(group.rank_names(), group.rank_info)}
