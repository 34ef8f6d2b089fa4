"""Weight sync: learner rank 0 -> every vLLM worker over a side group; growing or shrinking the
fleet between steps (which rebuilds that group)."""

from __future__ import annotations

import dataclasses
import logging
import time

import ray
import torch

from fleetrl.core.nodes import placement
from fleetrl.core.weight_check import compare_checksums, probe_diff, probe_tolerance
from fleetrl.data.rows import render_prompt
from fleetrl.learner.group import LearnerGroup
from fleetrl.online.collect import GroupCollector
from fleetrl.rollout.fleet import EngineDead, RolloutFleet

log = logging.getLogger("fleetrl")


class WeightVerifyError(RuntimeError):
    """A worker still did not hold the learner's weights after rollout.verify_weights_retries resends."""


@dataclasses.dataclass
class _Probe:
    """One version's log-prob probe: the learner's and the workers' calls scoring the same tokens."""

    version: int
    learner_refs: list
    indices: list[int]
    refs: list
    sent_dtypes: set[str]


class WeightSync:
    """Learner rank 0 -> every vLLM worker, over a side group; bumps the fleet's weight version."""

    def __init__(self, learner: LearnerGroup, fleet: RolloutFleet, backend: str):
        self.learner = learner
        self.fleet = fleet
        self.backend = backend
        self.version = 0
        self.workers_dropped = 0  # workers lost during a broadcast (dropped; the others got the weights)
        self.verify_failed = 0  # syncs (counted per worker) whose check after the reload failed
        self.verify_s = 0.0  # the last sync's check on its critical path: checksum wait + read-back + comparison
        self.verify_unchecked = 0  # sent tensors no loaded parameter holds (last check, per worker)
        # ... of which: held by no loaded parameter / by one the engine cannot read back (CPU oneDNN).
        self.unchecked_names: list[str] = []
        self.unreadable_names: list[str] = []
        # The log-prob probe after the checksums (rollout.verify_probe_tokens): fixed token ids set by
        # the driver (probe_token_ids); empty = no probe. Last probe's worst worker and its seconds.
        self.probe_ids: list[int] = []
        self.probe_abs_diff = 0.0  # mean |log p_fleet - log p_learner| over the probe's tokens
        self.probe_max_abs_diff = 0.0
        self.probe_s = 0.0  # the probe's time on the last sync's critical path
        self._pending_probe: _Probe | None = None  # a version's probe running while the fleet generates
        self._probe_now = False  # a probe failed: the next one is checked before its sync returns
        self._plan = None
        self.last_refs: tuple[list, list] = ([], [])  # the last send's (learner, fleet) refs, for benches
        self.connect()

    def connect(self) -> None:
        """(Re)build the side group; needed again whenever the fleet's membership changes."""
        host, port = self.learner.side_group_address()
        world = self.fleet.weight_group_world_size()
        self._wait("joining the weight-sync group", self.learner.init_weight_sync(host, port, world, self.backend),
                   self.fleet.init_weight_group(host, port, self.backend))
        self._members = tuple(self.fleet.indices())

    def _wait(self, what: str, learner_refs: list, fleet_refs: list, drop_lost: bool = False) -> list[int]:
        """Wait for both sides within rollout.weight_sync_timeout_s; a TimeoutError names who is late.

        ``drop_lost``: a worker that died meanwhile is taken out of the fleet (its calls come back
        to the collector as lost), and so is any worker still blocked in the broadcast by then; the
        learner's error from the broken group is then expected. Returns the dropped indices.
        """
        timeout = self.fleet.cfg.weight_sync_timeout_s
        names = {r: f"learner rank {i}" for i, r in enumerate(learner_refs)}
        worker_of = dict(zip(fleet_refs, self.fleet.indices()))
        names.update({r: f"rollout worker {i}" for r, i in worker_of.items()})
        _, late = ray.wait(list(names), num_returns=len(names), timeout=timeout)
        dead = [worker_of[r] for r in fleet_refs if r not in late and _died(r)] if drop_lost else []
        if dead and not any(r in late for r in learner_refs):
            stuck = [worker_of[r] for r in late]
            for index in dead + stuck:
                self.fleet.remove_worker(index, wait=True, timeout_s=0)
            for r in learner_refs:
                try:
                    ray.get(r)
                except ray.exceptions.RayActorError:
                    raise  # the learner itself died: not a fault the sync can absorb
                except Exception as e:  # the side group broke when the peer went away; rebuilt next
                    log.info("learner side of the broken broadcast: %s", str(e).splitlines()[0][:200])
            return dead + stuck
        if late:
            raise TimeoutError(
                f"weight sync ({what}) did not finish within rollout.weight_sync_timeout_s={timeout:.0f}s: "
                f"no answer from {', '.join(names[r] for r in late)}. A peer that stalls blocks the broadcast "
                "for everyone: check that process (the Ray dashboard names its actor), or raise the timeout "
                "for very large models")
        ray.get(list(names))  # raises a side's own error, if it failed
        return []

    def push(self, version: int) -> float:
        """Send the learner's weights as ``version`` to every worker. A worker lost during the
        broadcast is dropped (replaced at the next step, like any dead worker): the group is built
        again without it and the weights sent again to the others.

        rollout.verify_weights: then each worker's parameters as loaded are checked against the
        learner's checksums; on a mismatch the version is sent again, and after
        rollout.verify_weights_retries resends a WeightVerifyError ends the run. Every
        rollout.verify_probe_every versions the log-prob probe follows (``_probe_start``): with
        rollout.verify_probe_wait, or after a probe failed, before this returns (a failure then
        resends like a checksum mismatch); otherwise it runs while the fleet generates and is
        checked at the next push (``settle_probe``)."""
        start = time.perf_counter()
        verify = self.fleet.cfg.verify_weights
        retries = self.fleet.cfg.verify_weights_retries
        probe = verify and self._probe_due(version)
        self.probe_s = 0.0
        self.settle_probe()  # the last version's probe, if it ran while the fleet generated
        wait_probe = probe and (self.fleet.cfg.verify_probe_wait or self._probe_now)
        attempt = 0
        while True:
            learner_refs, fleet_refs = self.last_refs = self._send(version, verify)
            if not verify:
                break
            bad = self._check(version, learner_refs, fleet_refs)
            if not bad and probe:
                t0 = time.perf_counter()
                pending = self._probe_start(version)
                if wait_probe:
                    bad = self._probe_compare(pending)
                else:
                    self._pending_probe = pending
                self.probe_s += time.perf_counter() - t0
            if not bad:
                break
            self.verify_failed += len(bad)
            detail = "; ".join(f"rollout worker {i}: {why}" for i, why in bad.items())
            if attempt >= retries:
                raise WeightVerifyError(
                    f"weight version {version}: after {attempt + 1} send(s) the fleet still does not hold the "
                    f"learner's weights ({detail}). A silently wrong fleet is worse than a stopped run: check "
                    "the vLLM version's reload_weights for this model (rollout.verify_weights_retries="
                    f"{retries})")
            attempt += 1
            log.warning("weight version %d: the check after the reload failed (%s); sending it again "
                        "(%d of rollout.verify_weights_retries=%d)", version, detail, attempt, retries)
        if wait_probe:
            self._probe_now = False  # the fleet passed a probe again: back to probing off the critical path
        self.version = version
        return time.perf_counter() - start

    def settle_probe(self) -> None:
        """Check the last version's probe, which ran while the fleet generated (finished long since,
        as a rule). A failure is counted in weight_sync/verify_failed, and the next sync's probe is
        then checked before that sync returns (resent, then WeightVerifyError, if it fails too)."""
        pending, self._pending_probe = self._pending_probe, None
        if pending is None:
            return
        t0 = time.perf_counter()
        bad = self._probe_compare(pending)
        self.probe_s += time.perf_counter() - t0
        if bad:
            self.verify_failed += len(bad)
            self._probe_now = True
            log.warning("weight version %d failed the log-prob probe while the fleet generated with it (%s); "
                        "the next version's probe is checked before its sync returns", pending.version,
                        "; ".join(f"rollout worker {i}: {why}" for i, why in bad.items()))

    def _probe_due(self, version: int) -> bool:
        every = self.fleet.cfg.verify_probe_every
        return bool(self.probe_ids) and version % every == 0

    def _probe_start(self, version: int) -> _Probe:
        """The learner and every worker start scoring the probe's tokens, with the weights just synced
        (the learner's next calls queue behind its forward)."""
        ids = self.probe_ids
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        learner_refs = self.learner.start_compute_logprobs(batch)
        indices = self.fleet.indices()
        refs = [self.fleet.book.handle(i).probe.remote(ids) for i in indices]
        return _Probe(version, learner_refs, indices, refs, {b.dtype for b in self._plan.buckets})

    def _probe_compare(self, probe: _Probe) -> dict[int, str]:
        """{worker: why} for each worker whose mean absolute log-prob difference from the learner's
        is over the tolerance (or not finite). A worker that died since is left to the collector."""
        timeout = self.fleet.cfg.weight_sync_timeout_s
        learner_lp = self.learner.finish_logprobs(probe.learner_refs, 1, timeout)[0, 1:].tolist()
        _, late = ray.wait(probe.refs, num_returns=len(probe.refs), timeout=timeout)
        if late:
            raise TimeoutError(
                f"weight version {probe.version}: the log-prob probe did not come back within "
                f"rollout.weight_sync_timeout_s={timeout:.0f}s from rollout worker(s) "
                f"{[i for i, r in zip(probe.indices, probe.refs) if r in late]}")
        bad: dict[int, str] = {}
        self.probe_abs_diff = self.probe_max_abs_diff = 0.0
        for index, ref in zip(probe.indices, probe.refs):
            try:
                got = ray.get(ref, timeout=timeout)  # finished (ray.wait above)
            except (ray.exceptions.RayActorError, EngineDead):
                continue
            mean, worst = probe_diff(learner_lp, got["logprobs"])
            tol = self.fleet.cfg.verify_probe_tolerance or probe_tolerance(got["dtype"], *probe.sent_dtypes)
            self.probe_abs_diff = max(self.probe_abs_diff, mean)
            self.probe_max_abs_diff = max(self.probe_max_abs_diff, worst)
            if not mean <= tol:
                bad[index] = (f"the log-prob probe ({len(learner_lp)} tokens) differs from the learner's "
                              f"by {mean:.4g} on average (max {worst:.4g}; tolerance {tol:g} for {got['dtype']})")
        return bad

    def _send(self, version: int, checksums: bool) -> tuple[list, list]:
        """One sync of ``version`` (again without any worker lost on the way); the refs of the last try."""
        while True:
            if tuple(self.fleet.indices()) != self._members:  # a worker died during the step
                self.connect()
            if self._plan is None:
                self._plan = self.learner.weight_plan(version)
            plan = dataclasses.replace(self._plan, version=version)  # keeps every field of the plan
            learner_refs = self.learner.send_weights(plan, checksums)
            fleet_refs = self.fleet.receive_weights(plan)
            dropped = self._wait(f"version {version}", learner_refs, fleet_refs, drop_lost=True)
            if not dropped:
                return learner_refs, fleet_refs
            self.workers_dropped += len(dropped)
            log.warning("rollout worker(s) %s lost during the broadcast of version %d: dropped, the weights "
                        "go again to the %d other(s); replaced at the next step", dropped, version,
                        self.fleet.num_workers)

    def _check(self, version: int, learner_refs: list, fleet_refs: list) -> dict[int, str]:
        """Compare each worker's loaded parameters with the learner's checksums: {worker: why} per mismatch."""
        timeout = self.fleet.cfg.weight_sync_timeout_s  # finished already (_wait): this returns at once
        sent = ray.get(learner_refs[0], timeout=timeout)
        if "checksums" not in sent:  # an adapter plan: what loads is not what was sent
            return {}
        t0 = time.perf_counter()
        bad: dict[int, str] = {}
        self.verify_unchecked = 0
        reports = ray.get(fleet_refs, timeout=timeout)
        for index, report in zip(self.fleet.indices(), reports):
            ranks = report.get("ranks") or []
            if len(ranks) != 1 or "loaded" not in ranks[0]:
                continue  # tensor-parallel shards (or an adapter load): not checked here
            loaded = {name: (None if cs is None else tuple(cs), dtype, names)
                      for name, (cs, dtype, names) in ranks[0]["loaded"].items()}
            mismatched, unreadable, missing = compare_checksums(sent["checksums"], sent["dtypes"], loaded)
            if len(missing) + len(unreadable) >= self.verify_unchecked:
                self.verify_unchecked = len(missing) + len(unreadable)
                self.unchecked_names, self.unreadable_names = missing, unreadable
            if mismatched:
                more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
                bad[index] = f"{len(mismatched)} parameter(s) differ: {'; '.join(mismatched[:3])}{more}"
        worker_s = max((r.get("verify_s", 0.0) for rep in reports for r in (rep.get("ranks") or [])),
                       default=0.0)
        # What the check adds to a sync: the learner's wait for its checksums after the last broadcast
        # (they are computed meanwhile), the worker's read-back after its reload, and this comparison.
        self.verify_s = sent.get("checksum_wait_s", 0.0) + worker_s + (time.perf_counter() - t0)
        return bad


def probe_token_ids(rows, tokenizer, num_tokens: int) -> list[int]:
    """The probe's fixed tokens: the first training prompts as the fleet sees them (rendered and
    tokenized like the collector's), joined until ``num_tokens``; [] when ``num_tokens`` is 0."""
    ids: list[int] = []
    for row in rows:
        if len(ids) >= num_tokens:
            break
        ids += tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"]
    return ids[:num_tokens] if len(ids) >= 2 else []


def _died(ref) -> bool:
    """Whether a finished call's worker died (its actor, or the vLLM engine inside it)."""
    try:
        ray.get(ref)
    except (ray.exceptions.RayActorError, EngineDead):
        return True
    except Exception:
        return False
    return False


def resize_fleet(fleet: RolloutFleet, sync: WeightSync, collector: GroupCollector, target: int) -> None:
    """Grow or shrink the fleet between steps. Removed workers finish their calls first (nothing is
    lost); new workers load the current weights before they take a prompt."""
    if target == fleet.num_workers:
        return
    before = fleet.num_workers
    while fleet.num_workers > target:
        index = max(fleet.indices())
        # A call older than rollout.generate_timeout_s is hung anyway: its prompts go to the others.
        unfinished = fleet.remove_worker(index, wait=True, timeout_s=fleet.cfg.generate_timeout_s)
        if unfinished:
            log.warning("rollout worker %d did not finish %d generate call(s) within rollout.generate_timeout_s="
                        "%.0fs while it was being removed; their prompts go to the other workers",
                        index, len(unfinished), fleet.cfg.generate_timeout_s)
        collector.requeue(unfinished)
    kept = set(fleet.indices())
    while fleet.num_workers < target:
        fleet.add_worker()
    infos = fleet.wait_ready()
    sync.connect()
    sync.push(sync.version)
    started = placement({f"rollout-{i}": info for i, info in zip(fleet.indices(), infos) if i not in kept})
    where = "; started " + ", ".join(f"{name} on {node}" for name, node in started.items()) if started else ""
    print(f"fleetrl: rollout fleet {before} -> {fleet.num_workers} worker(s), "  # noqa: T201 (console progress)
          f"weights at version {sync.version}{where}", flush=True)
