"""Learner -> vLLM weight sync through the real services: DeepSpeed rank and vLLM worker as Ray actors.

After a training step and a sync, vLLM's logprobs of a fixed completion match the learner's within a
tolerance, and differ from what vLLM gave before the sync. The check after every sync (issue 24) runs
on the real worker: a reload that leaves a layer stale (injected with FLEETRL_WEIGHT_FAULT) is caught,
sent again and then verifies; layer matrices loaded with their rows moved (which the checksums cannot
see) are caught by the log-prob probe at the next sync, whose probe is then waited for; the prefix
cache is reset after each load; a fault that outlasts rollout.verify_weights_retries stops the sync
with WeightVerifyError; a reload that breaks halfway takes the worker out of the fleet. While these
services are up, no process of the run (Ray, the learner rank and its gloo groups, the vLLM engine and
its engine-core process) listens on a non-loopback address (issue 11, "closed by default").
"""

import ipaddress
import os

import psutil
import pytest
import ray
import torch

from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.group import LearnerGroup
from fleetrl.online.batch import Sample, pad_samples
from fleetrl.online.weights import WeightSync, WeightVerifyError
from fleetrl.rollout.config import RolloutConfig
from fleetrl.rollout.fleet import RolloutFleet

pytestmark = pytest.mark.e2e


def listening_sockets(root_pid: int) -> list[dict]:
    """TCP listeners and unbound UDP sockets of ``root_pid`` and every process below it."""
    root = psutil.Process(root_pid)
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    seen = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        if not (c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)):
            continue
        try:
            proc = psutil.Process(c.pid)
            cmd = f"{proc.name()}: {' '.join(proc.cmdline())[:80]}"
        except psutil.Error:
            cmd = "?"
        ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        seen.append({"cmd": cmd, "ip": c.laddr.ip, "port": c.laddr.port, "loopback": ip.is_loopback})
    return seen


def test_sync_after_training_makes_vllm_match_the_learner(ray_local, tiny_policy, caplog):
    model = str(tiny_policy)
    fleet = RolloutFleet(
        RolloutConfig(num_workers=1, max_model_len=256, enforce_eager=True, cpu_kvcache_space_gb=1,
                      dtype="float32", env_vars={"VLLM_LOGGING_LEVEL": "WARNING",
                                                  "FLEETRL_WEIGHT_FAULT":
                                                      "stale_layer@1,permute_rows@2,miss_update@4,interrupt_reload@5"}),
        model, name_prefix="wsync/",
    )
    learner = LearnerGroup(LearnerConfig(zero_stage=3, lr=5e-2, micro_batch_size=2, reference=False,
                                         weight_sync_bucket_mb=1, loss={"kl_coef": 0.0}),
                           model, total_steps=5, mini_batch_size=2, name_prefix="wsync/")
    try:
        fleet.wait_ready()
        sync = WeightSync(learner, fleet, backend="gloo")
        worker = fleet.book.handle(fleet.book.indices()[0])

        prompt, completion = [5, 17, 42, 99], [7, 7, 7, 120, 3]
        sync.probe_ids = prompt + completion  # the log-prob probe after the checksums
        rows = [Sample(0, "", prompt, completion, [0.0] * len(completion), "stop", 0),
                Sample(0, "", prompt, [8, 9], [0.0, 0.0], "stop", 0)]
        batch = pad_samples(rows, pad_id=0)
        batch["old_logprobs"] = learner.compute_logprobs(batch) * batch["loss_mask"]
        p = len(prompt)
        before_vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        before_learner = learner.compute_logprobs(batch)[0, p:p + len(completion)]
        assert torch.allclose(before_vllm, before_learner, atol=1e-3)

        batch["advantages"] = torch.tensor([1.0, -1.0])  # push the first completion up
        learner.train(batch, mini_batch_size=2)
        sync.push(version=1)  # the first load of version 1 leaves layer 0 stale: caught, sent again
        assert sync.verify_failed == 1
        assert sync.unchecked_names == []  # every sent tensor is held by a loaded parameter
        # vLLM's CPU backend packs linear weights for oneDNN and keeps no tensor to read back: only
        # those go unchecked by the checksums (the logprob comparison below covers them).
        assert sync.unreadable_names and all(n.endswith("_proj.weight") for n in sync.unreadable_names)
        assert sync.verify_unchecked == len(sync.unreadable_names)
        assert sync.verify_s > 0
        assert ray.get(worker.ping.remote())["prefix_cache_resets"] == {1: 2}  # after each of the two loads

        after_vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        after_learner = learner.compute_logprobs(batch)[0, p:p + len(completion)]
        assert ray.get(worker.get_weight_version.remote()) == 1
        assert (after_vllm - before_vllm).abs().max() > 0.05  # the sync changed vLLM's model
        assert after_vllm.sum() > before_vllm.sum()  # in the direction of the update
        assert torch.allclose(after_vllm, after_learner, atol=1e-3), (after_vllm, after_learner)

        # Layer 0's matrices loaded with their rows reversed: the checksums cannot see it (and on the
        # CPU cannot read those weights back at all). The log-prob probe runs while the fleet
        # generates and is checked at the next sync, whose own probe is then waited for.
        learner.train(batch, mini_batch_size=2)
        sync.push(version=2)  # settles version 1's probe (passed), starts version 2's
        assert 0 < sync.probe_abs_diff < 1e-3 and sync.probe_s > 0
        assert sync.verify_failed == 1
        learner.train(batch, mini_batch_size=2)
        with caplog.at_level("WARNING", logger="fleetrl"):
            sync.push(version=3)
        assert sync.verify_failed == 2
        assert ("weight version 2 failed the log-prob probe while the fleet generated with it (rollout worker 0: "
                "the log-prob probe" in caplog.text)
        assert sync.probe_abs_diff < 1e-3 and sync._pending_probe is None  # version 3's, waited for: passed
        after_vllm = torch.tensor(ray.get(worker.score.remote(prompt, completion)))
        assert torch.allclose(after_vllm, learner.compute_logprobs(batch)[0, p:p + len(completion)], atol=1e-3)

        # A fault that outlasts the retries (none here) stops the run loudly instead of serving it.
        fleet.cfg.verify_weights_retries = 0
        learner.train(batch, mini_batch_size=2)  # new weights, which this worker then misses
        with pytest.raises(WeightVerifyError, match="weight version 4: after 1 send.*rollout worker 0"):
            sync.push(version=4)
        assert sync.verify_failed == 3

        # A reload that breaks halfway (the weights stop arriving while vLLM loads them as they come)
        # leaves no version whole: the worker takes itself out of service and the sync drops it.
        learner.train(batch, mini_batch_size=2)
        assert ray.get(worker.ping.remote())["worker_index"] == 0
        sync.push(version=5)
        assert sync.workers_dropped == 1 and fleet.num_workers == 0

        # The session's Ray was started by this process: everything of the run is below it.
        sockets = listening_sockets(os.getpid())
        names = {s["cmd"].split(":", 1)[0] for s in sockets}
        assert {"raylet", "gcs_server"} <= names, sockets  # the scan saw the run's processes
        exposed = [s for s in sockets if not s["loopback"]]
        assert not exposed, f"processes of the run listen on non-loopback addresses: {exposed}"
    finally:
        fleet.shutdown()
        learner.shutdown()
