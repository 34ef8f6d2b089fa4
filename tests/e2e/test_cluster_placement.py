"""fleetrl on a real multi-node Ray cluster (ray.cluster_utils.Cluster: a head and four nodes on this
machine, each a raylet of its own with its own CPUs and custom resources: two `rollout` nodes, two
`train` nodes).

One short GRPO run placed by node kind: the rollout worker on a rollout node, the two learner ranks
on the two train nodes (a rendezvous across nodes), the run's outputs (metrics, both ranks'
checkpoint manifests, final_model/) in S3-compatible storage every node reaches. After step 1 the
rollout worker's node is drained through Ray (a preemption): the worker leaves between steps, its
replacement starts on the other rollout node. Then a rollout node joins and `fleetrl scale` grows the
fleet onto it. Then nodes die without notice: the node of the worker `fleetrl scale` added is removed
mid-generate (its prompts go to the other worker, its replacement starts on a spare rollout node), and
the node of learner rank 1 is removed (the run restarts once from its last complete checkpoint, its
ranks on the train node left and a spare). A graceful stop ends the run. Across all of it the steps and
weight versions run 1..N and every prompt is trained exactly once. Before the run,
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


def _freeze_rollout_worker(node) -> list[int]:
    """SIGSTOP the rollout worker process that ``node``'s raylet started: a generate call the driver
    sends it from now on stays in flight (it cannot answer), so the node's removal that follows is
    mid-generate for sure. Returns every process under that raylet (to SIGKILL once the node is
    removed: a stopped process cannot exit by itself)."""
    import signal

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, below = [node.all_processes["raylet"][0].process.pid], []
    while todo:
        below.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    frozen = []
    for pid in below:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RolloutWorker"):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
        except OSError:
            continue
    assert len(frozen) == 1, f"expected one rollout worker process under node {node.node_id[:8]}, got {frozen}"
    return below


def _kill(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


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
             "run.checkpoint_every=4", "run.keep_last=0", "rl.eval_every=0", "run.max_restarts=1"]
    # Run as a process whose console is read live. Each event is applied between steps, a step or more
    # after it is asked for (tiny steps take well under a second), so the run is open-ended and told
    # to stop once everything happened:
    # 1. once step 1 is done, the node holding the rollout worker is drained (as a preemption or a
    #    scale-down would): the worker leaves between steps, its replacement starts on the other
    #    rollout node;
    # 2. then a rollout node joins the cluster and `fleetrl scale` asks for 2 workers: the second
    #    starts on the node that joined;
    # 3. then a spare rollout node joins, and the node of the worker that `fleetrl scale` added is
    #    removed (killed, no drain) while a generate call of the step is in flight there: its prompts go
    #    to the other worker, its replacement starts on the spare node;
    # 4. then a spare train node joins, and the node of learner rank 1 is removed: the run fails, and
    #    restarts once (run.max_restarts=1) from its last complete checkpoint, its ranks on the train
    #    node left and the spare;
    # 5. a step after the resume, a graceful stop (the STOP file in the run's storage): the run ends
    #    after a step, with a checkpoint and the final model.
    uri = "s3://fleetrl-nodes/runs/nodes"
    cmd = [sys.executable, "-m", "fleetrl", "train", str(EXAMPLE), f"ray.address={cluster.address}",
           "run.output_dir=s3://fleetrl-nodes/runs", "run.name=nodes", "run.steps=400", "run.log_samples=true",
           *options, *KINDS, *small]
    added = replaced = grown = stopped = spare = killed = spare_train = lost_train = resumed = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines, drained, placement = [], None, {}
    try:
        watchdog = threading.Timer(900, proc.kill)  # every wait has a deadline
        watchdog.start()
        for ln in proc.stdout:
            lines.append(ln.rstrip("\n"))
            if ln.startswith("fleetrl: placement: ") and drained is None:
                placement = _placement(ln.rstrip("\n"))
                worker_node = placement["rollout-0"].split("[")[1].rstrip("]")
                drained = next(n for n in rollouts if n.node_id.startswith(worker_node))
            step_line = ln.startswith("fleetrl: step ")
            if ln.startswith("fleetrl: step 1/") and drained is not None:
                _drain(cluster.address, drained.node_id, deadline_s=120)
            replaced = replaced or "started rollout-1 on" in ln
            grown = grown or "rollout fleet 1 -> 2 worker(s)" in ln
            if replaced and added is None and step_line:
                added = cluster.add_node(num_cpus=1, resources={"rollout": 1})  # returns once it is up
                scale = subprocess.run([sys.executable, "-m", "fleetrl", "scale", "nodes", "--rollout-workers", "2",
                                        "--address", cluster.address, "--wait", "0"], env=_env(),
                                       capture_output=True, text=True, timeout=120)
                assert "rollout worker(s) (asked 2" in scale.stdout, scale.stdout + scale.stderr
            if grown and spare is None and step_line:
                # The step's weights are synced when its line is printed; the next step's generate calls
                # (2 of its 4 prompts to each worker) reach a worker that cannot answer.
                below = _freeze_rollout_worker(added)
                spare = cluster.add_node(num_cpus=1, resources={"rollout": 1})
                # Meanwhile the driver starts the next step and its calls (steps take < 1 s; 3 s leaves room
                # for a step that also checkpoints to S3 on a loaded machine).
                time.sleep(3)
                cluster.remove_node(added)
                _kill(below)
                killed = True
            if killed and spare_train is None and "started rollout-3 on" in ln:
                spare_train = cluster.add_node(num_cpus=1, resources={"train": 1})
                lost_train = next(t for t in trains if placement["learner-rank-1"].endswith(f"[{t.node_id[:8]}]"))
                cluster.remove_node(lost_train)
            resumed = resumed or ln.startswith("fleetrl: resumed from ")
            if resumed and stopped is None and step_line:
                stopped = request_graceful_stop(uri, s3_server)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    console = "\n".join(lines)
    assert proc.returncode == 0, console[-6000:]
    assert drained is not None and lost_train is not None, console[-6000:]

    # Placed by the node kind its resources name: the worker on a rollout node, one rank per train node.
    first, again = [_placement(ln) for ln in lines if ln.startswith("fleetrl: placement: ")]
    at = {n.node_id: f"{n.node_ip_address} [{n.node_id[:8]}]" for n in [*rollouts, *trains, added, spare, spare_train]}
    assert first["rollout-0"] in {at[n.node_id] for n in rollouts}, first
    assert {first["learner-rank-0"], first["learner-rank-1"]} == {at[t.node_id] for t in trains}, first
    # The drained node's worker left between steps; its replacement went to the rollout node that stays.
    assert f"fleetrl: node {drained.node_id[:8]} is draining: rollout worker 0 left after finishing" in console, \
        console[-6000:]
    other = next(n for n in rollouts if n is not drained)
    assert f"started rollout-1 on {at[other.node_id]}" in console, console[-6000:]
    # `fleetrl scale` grew the fleet onto the node added during the run.
    assert f"started rollout-2 on {at[added.node_id]}" in console, console[-6000:]
    # That node was removed while its worker had generate calls in flight (the collector says so only
    # for a worker that dies with a call of its own): its prompts went to the other worker, and its
    # replacement started on the spare rollout node.
    assert "rollout worker 2 died (ActorDiedError); its prompts go to the other workers" in console, console[-6000:]
    assert f"started rollout-3 on {at[spare.node_id]}" in console, console[-6000:]
    # The node of learner rank 1 was removed: one restart, from the last complete checkpoint, with the
    # services placed again on the nodes that are there now.
    (restart,) = [ln for ln in lines if "restart 1/1 of the services from " in ln]
    ckpt_step = int(restart.rsplit("step-", 1)[1][:6])
    assert f"fleetrl: resumed from {uri}/checkpoints/step-{ckpt_step:06d} at step {ckpt_step}" in console, \
        console[-6000:]
    left = next(t for t in trains if t is not lost_train)
    assert {again["learner-rank-0"], again["learner-rank-1"]} == {at[left.node_id], at[spare_train.node_id]}, again
    # The fleet starts again with rollout.num_workers (then grows to the checkpoint's `fleetrl scale` size),
    # on the rollout nodes still there.
    assert {again[w] for w in again if w.startswith("rollout-")} <= {at[other.node_id], at[spare.node_id]}, again
    assert stopped and "stop requested; ending after step" in console, console[-6000:]

    # It trained, and what ranks on other nodes wrote is in the run's storage.
    store = Storage(s3_server)
    rows = [json.loads(r) for r in store.read_text(f"{uri}/metrics.jsonl").splitlines()]
    steps = len(rows)
    # One step sequence across the restart (the rows of the steps redone after the checkpoint were
    # dropped on resume): the weights advance one version a step, restarts counted from the resume on.
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and steps < 400
    assert [r["weight_version"] for r in rows] == list(range(1, steps + 1))
    assert [r["run/restarts"] for r in rows] == [0] * ckpt_step + [1] * (steps - ckpt_step) and ckpt_step < steps
    # The collector's counters are per service start: the drain is counted in the rows before the restart.
    before = rows[:ckpt_step]
    assert max(r["rollout/workers_drained"] for r in rows) == 1 and rows[0]["rollout/workers_drained"] == 0
    assert before[-1]["rollout/workers_drained"] == 1, [r["rollout/workers_drained"] for r in rows]
    per_prompt: dict[int, list] = {}
    for sample in store.read_text(f"{uri}/samples.jsonl").splitlines():
        sample = json.loads(sample)
        per_prompt.setdefault(sample["prompt_index"], []).append(sample["step"])
    # Each prompt trained once, its whole group in one step, across the worker's loss and the restart.
    assert len(per_prompt) == steps * 4, (len(per_prompt), steps)
    assert all(len(v) == 4 and len(set(v)) == 1 for v in per_prompt.values()), per_prompt
    # Where the step's advantages were not all zero it moved the policy (reward/std is across groups:
    # every group can tie while it is above 0, so it is not the condition).
    assert all(r["train/grad_norm"] > 0 for r in rows if r["advantage/std"] > 0)
    for step in (ckpt_step, steps):  # the checkpoint the run restarted from (run.keep_last=0), the stop's
        ckpt = store.file_sizes(f"{uri}/checkpoints/step-{step:06d}")
        assert {"COMPLETE", ".manifest-rank-0.json", ".manifest-rank-1.json"} <= set(ckpt), (step, sorted(ckpt))
    assert {"COMPLETE", "config.json", "model.safetensors"} <= set(store.file_sizes(f"{uri}/final_model"))
