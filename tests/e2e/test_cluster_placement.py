"""fleetrl on a real multi-node Ray cluster (ray.cluster_utils.Cluster: a head and four nodes on this
machine, each a raylet of its own with its own CPUs and custom resources: two `rollout` nodes, two
`train` nodes).

One short GRPO run placed by node kind: the rollout worker on a rollout node, the two learner ranks
on the two train nodes (a rendezvous across nodes), the run's outputs (metrics, both ranks'
checkpoint manifests, final_model/) in S3-compatible storage every node reaches. After step 1 the
rollout worker's node is drained through Ray (a preemption): the worker leaves between steps, its
replacement starts on the other rollout node. Then a rollout node joins and `fleetrl scale` grows the
fleet onto it, and a graceful stop ends the run. Every prompt is trained exactly once. Before the run,
`fleetrl check` against the same cluster: a local run.output_dir is refused while ranks may run on
other nodes; per service, which nodes can hold one of its actors; a service no alive node can hold
is refused, before and after a node is lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_tiny.yaml"


@pytest.fixture(scope="module")
def node_kinds():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # One rollout slot per rollout node: after the drain the node left is full, so the worker that
    # `fleetrl scale` adds can only go to the node added during the run.
    rollouts = [cluster.add_node(num_cpus=2, resources={"rollout": 1}),
                cluster.add_node(num_cpus=1, resources={"rollout": 1})]
    trains = [cluster.add_node(num_cpus=1, resources={"train": 1}) for _ in range(2)]
    cluster.wait_for_nodes(timeout=60)
    yield cluster, rollouts, trains
    cluster.shutdown()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _fleetrl(command: str, address: str, *overrides: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetrl", command, str(EXAMPLE), f"ray.address={address}",
                           *overrides], capture_output=True, text=True, timeout=timeout, env=_env())


def _placement(line: str) -> dict[str, str]:
    """actor -> "IP [node id]" from the run's `fleetrl: placement: N node(s): IP [id]: a, b; ...` line."""
    by_actor = {}
    for part in line.split(" node(s): ", 1)[1].split("; "):
        node, actors = part.split("]: ")
        by_actor.update({actor: node + "]" for actor in actors.split(", ")})
    return by_actor


def _drain(address: str, node_id: str, deadline_s: float) -> None:
    """Drain a node as the autoscaler or KubeRay would before removing it (a preemption: accepted even
    while the node is busy; its actors run on until they leave or the deadline passes)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = GcsClient(address=address).drain_node(node_id, reason, "fleetrl test: preempted",
                                                          int((time.time() + deadline_s) * 1000))
    assert accepted, why


KINDS = ["rollout.resources={rollout: 1}", "learner.resources_per_rank={train: 1}", "reward.num_cpus=0.5"]


def test_check_places_each_service_by_node_and_refuses_what_no_node_can_hold(node_kinds):
    cluster, rollouts, trains = node_kinds
    rollout = rollouts[0]
    # The ranks go on train nodes, not the driver's: a local run.output_dir would leave their
    # checkpoints there, so it is refused unless declared a shared mount.
    done = _fleetrl("check", cluster.address, "rollout.num_workers=2", *KINDS)
    assert done.returncode == 2
    assert "run.output_dir=runs is a local path, but learner ranks may run on other nodes (" in done.stderr
    assert all(f"[{t.node_id[:8]}]" in done.stderr for t in trains) and "set run.output_dir_shared=true" \
        in done.stderr, done.stderr
    kinds = ["rollout.num_workers=2", *KINDS, "run.output_dir_shared=true"]
    done = _fleetrl("check", cluster.address, *kinds)
    assert done.returncode == 0, done.stderr
    rollout_id = rollout.node_id[:8]
    line = next(ln for ln in done.stdout.splitlines() if "rollout worker(s)" in ln)
    assert line.strip().startswith("2 rollout worker(s) (each CPU 1, rollout 1) can go on: ") and \
        f"{rollout.node_ip_address} [{rollout_id}] (CPU 2, rollout 1) x1" in line and \
        f"[{rollouts[1].node_id[:8]}] (CPU 1, rollout 1) x1" in line, line
    line = next(ln for ln in done.stdout.splitlines() if "learner rank(s)" in ln)
    assert all(f"[{t.node_id[:8]}] (CPU 1, train 1) x1" in line for t in trains) and rollout_id not in line, line
    assert "reward actor(s) (each CPU 0.5) can go on:" in done.stdout  # anywhere

    # A kind of node the cluster does not have: refused before anything starts, naming the keys.
    done = _fleetrl("check", cluster.address, *kinds, "reward.resources={judge: 1}")
    assert done.returncode == 2
    assert "no node can hold a reward actor (one asks for CPU 0.5, judge 1); the nodes have: " in done.stderr
    assert "(`ray start --resources='{\"judge\": 1.0}'`, or a KubeRay worker group's rayStartParams) or change " \
           "reward.num_cpus / num_gpus / resources" in done.stderr, done.stderr

    # A train node is lost: check answers for the cluster as it is now. Two ranks no longer fit; one
    # does, and only on the node left.
    lost, left = trains
    cluster.remove_node(lost)
    done = _fleetrl("check", cluster.address, *kinds, "learner.num_ranks=2")
    assert done.returncode == 2
    assert "train: the run asks for 2, the cluster has 1" in done.stderr, done.stderr
    done = _fleetrl("check", cluster.address, *kinds, "learner.num_ranks=1")
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "learner rank(s)" in ln)
    assert f"[{left.node_id[:8]}]" in line and f"[{lost.node_id[:8]}]" not in line, line
    # A new train node takes the lost one's place, for the run that follows.
    trains[trains.index(lost)] = cluster.add_node(num_cpus=1, resources={"train": 1})
    cluster.wait_for_nodes(timeout=60)


def test_a_run_placed_by_node_kind_trains_across_nodes_into_shared_storage(node_kinds, s3_server):
    import s3fs

    from fleetrl.core.storage import Storage
    from fleetrl.run.runtime import request_graceful_stop

    cluster, rollouts, trains = node_kinds
    s3fs.S3FileSystem(**s3_server).mkdir("fleetrl-nodes")
    options = [f"run.storage_options.{k}={v}" for k, v in s3_server.items() if k != "client_kwargs"]
    options.append("run.storage_options.client_kwargs.region_name=eu-west-1")
    small = ["rollout.num_workers=1", "learner.num_ranks=2", "rl.prompts_per_step=4", "rl.group_size=4",
             "learner.micro_batch_size=8", "rollout.sampling.max_tokens=8", "rl.max_staleness=0",
             "run.checkpoint_every=10", "rl.eval_every=0"]
    # Run as a process whose console is read live. Each event is applied between steps, a step or more
    # after it is asked for (tiny steps take well under a second), so the run is open-ended and told
    # to stop once everything happened:
    # 1. once step 1 is done, the node holding the rollout worker is drained (as a preemption or a
    #    scale-down would): the worker leaves between steps, its replacement starts on the other
    #    rollout node;
    # 2. then a rollout node joins the cluster and `fleetrl scale` asks for 2 workers: the second
    #    starts on the node that joined;
    # 3. then a graceful stop (the STOP file in the run's storage): the run ends after a step, with a
    #    checkpoint and the final model.
    uri = "s3://fleetrl-nodes/runs/nodes"
    cmd = [sys.executable, "-m", "fleetrl", "train", str(EXAMPLE), f"ray.address={cluster.address}",
           "run.output_dir=s3://fleetrl-nodes/runs", "run.name=nodes", "run.steps=400", "run.log_samples=true",
           *options, *KINDS, *small]
    added = replaced = grown = stopped = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines, drained = [], None
    try:
        watchdog = threading.Timer(900, proc.kill)  # every wait has a deadline
        watchdog.start()
        for ln in proc.stdout:
            lines.append(ln.rstrip("\n"))
            if ln.startswith("fleetrl: placement: ") and drained is None:
                worker_node = _placement(ln)["rollout-0"].split("[")[1].rstrip("]")
                drained = next(n for n in rollouts if n.node_id.startswith(worker_node))
            if ln.startswith("fleetrl: step 1/") and drained is not None:
                _drain(cluster.address, drained.node_id, deadline_s=120)
            replaced = replaced or "started rollout-1 on" in ln
            grown = grown or "rollout fleet 1 -> 2 worker(s)" in ln
            if replaced and added is None and ln.startswith("fleetrl: step "):
                added = cluster.add_node(num_cpus=1, resources={"rollout": 1})  # returns once it is up
                scale = subprocess.run([sys.executable, "-m", "fleetrl", "scale", "nodes", "--rollout-workers", "2",
                                        "--address", cluster.address, "--wait", "0"], env=_env(),
                                       capture_output=True, text=True, timeout=120)
                assert "rollout worker(s) (asked 2" in scale.stdout, scale.stdout + scale.stderr
            if grown and stopped is None and ln.startswith("fleetrl: step "):
                stopped = request_graceful_stop(uri, s3_server)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    console = "\n".join(lines)
    assert proc.returncode == 0, console[-6000:]
    assert drained is not None, console[-6000:]

    # Placed by the node kind its resources name: the worker on a rollout node, one rank per train node.
    (line,) = [ln for ln in lines if ln.startswith("fleetrl: placement: ")]
    by_actor = _placement(line)
    assert by_actor["rollout-0"] in {f"{n.node_ip_address} [{n.node_id[:8]}]" for n in rollouts}, line
    rank_nodes = {by_actor["learner-rank-0"], by_actor["learner-rank-1"]}
    assert rank_nodes == {f"{t.node_ip_address} [{t.node_id[:8]}]" for t in trains}, line
    # The drained node's worker left between steps; its replacement went to the rollout node that stays.
    assert f"fleetrl: node {drained.node_id[:8]} is draining: rollout worker 0 left after finishing" in console, \
        console[-6000:]
    other = next(n for n in rollouts if n is not drained)
    assert f"started rollout-1 on {other.node_ip_address} [{other.node_id[:8]}]" in console, console[-6000:]
    # `fleetrl scale` grew the fleet onto the node added during the run.
    assert f"started rollout-2 on {added.node_ip_address} [{added.node_id[:8]}]" in console, console[-6000:]
    assert stopped and "stop requested; ending after step" in console, console[-6000:]

    # It trained, and what ranks on other nodes wrote is in the run's storage.
    store = Storage(s3_server)
    rows = [json.loads(r) for r in store.read_text(f"{uri}/metrics.jsonl").splitlines()]
    steps = len(rows)
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1)) and steps < 400
    assert rows[-1]["rollout/workers_drained"] == 1 and rows[0]["rollout/workers_drained"] == 0
    per_prompt: dict[int, set] = {}
    for sample in store.read_text(f"{uri}/samples.jsonl").splitlines():
        sample = json.loads(sample)
        per_prompt.setdefault(sample["prompt_index"], set()).add(sample["step"])
    assert len(per_prompt) == steps * 4 and all(len(v) == 1 for v in per_prompt.values())  # each once, across it
    # Where the step's advantages were not all zero it moved the policy (reward/std is across groups:
    # every group can tie while it is above 0, so it is not the condition).
    assert all(r["train/grad_norm"] > 0 for r in rows if r["advantage/std"] > 0)
    ckpt = store.file_sizes(f"{uri}/checkpoints/step-{steps:06d}")  # the stop's checkpoint
    assert {"COMPLETE", ".manifest-rank-0.json", ".manifest-rank-1.json"} <= set(ckpt), sorted(ckpt)
    assert {"COMPLETE", "config.json", "model.safetensors"} <= set(store.file_sizes(f"{uri}/final_model"))
