"""Which Ray node a process runs on, and the run's placement in one line.

Each service's readiness answer (a rollout worker's ``ping``, a learner rank's ``info``) carries
``this_node()``; ``placement_line`` turns them into the line ``fleetrl train`` prints at start, so a
user sees where each actor landed without the dashboard (and a test can check it on a multi-node
cluster)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def this_node() -> dict[str, str]:
    """{"node_id", "node_ip"} of the Ray node this process runs on; {} outside a Ray worker or driver."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - a placement report is never worth failing a start-up for
        return {}


def placement(actors: dict[str, dict[str, Any]]) -> dict[str, str]:
    """actor name -> "IP [node id's first 8]" for each actor whose info carries this_node()'s keys."""
    return {name: f"{info['node_ip']} [{str(info['node_id'])[:8]}]"
            for name, info in actors.items() if info.get("node_id")}


def placement_line(actors: dict[str, dict[str, Any]]) -> str:
    """'2 nodes: 10.0.0.6 [fe4dd554]: rollout-0, rollout-1; 10.0.0.7 [abc4c83e]: learner-rank-0'."""
    by_node: dict[str, list[str]] = {}
    for name, node in placement(actors).items():
        by_node.setdefault(node, []).append(name)
    return f"{len(by_node)} node(s): " + "; ".join(f"{node}: {', '.join(names)}" for node, names in by_node.items())


def draining_nodes() -> dict[str, float]:
    """Node id (hex) -> drain deadline (time.time() seconds; 0: none given) of every node Ray is
    draining (``ray drain-node``, the autoscaler, KubeRay). {} when Ray cannot say: then nothing is
    treated as draining, and a node that goes counts as lost."""
    try:
        import ray

        # Ray's own Train and Data libraries read draining nodes the same way; no public API yet.
        return {node: ms / 1000.0 for node, ms in ray._private.state.state.get_draining_nodes().items()}
    except Exception as e:  # noqa: BLE001 - a state query that fails must not fail a step or a check
        log.debug("could not read Ray's draining nodes: %s", e)
        return {}
