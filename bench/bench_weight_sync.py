"""Weight-sync bandwidth learner -> rollout fleet vs a raw broadcast of the same bytes, in one run.

Spine: a ``LearnerGroup`` (1 DeepSpeed rank, a Ray actor) sends the policy with ``send_weights``
while a ``RolloutFleet`` (1, then 2 vLLM workers, Ray actors) takes it with ``receive_weights``:
bucket packing on the learner, a broadcast per bucket over the side group, then ONE vLLM
``reload_weights`` per worker. The learner makes the plan for each bucket size
(``weight_plan(bucket_mb=...)``), so one learner serves every bucket size.

Baseline ("raw"): plain Ray actors (the same kind of process: one sender, one receiver per vLLM
worker) joined by ``fleetrl.core.weight_wire.init_side_group`` over the same backend, broadcasting
preallocated flat tensors with exactly the spine's bucket sizes: the wire alone. A second raw
variant ("fresh buffer") allocates every bucket anew on both ends and has the sender copy its
data in first, as the spine does: it tells allocation and copying apart from the rest.

First table: the spine against the least a sync must do, raw broadcast + one vLLM reload of the
same bytes (the raw baseline's wall time plus the spine's own reload, both from this run), as a
ratio (1.0: the spine adds nothing; above 1: the spine's reload overlapped its receive), and the
verification's share of a sync: what it puts on the
critical path (the learner's wait for its checksums after its last broadcast, the workers'
read-back after the reload, the driver's comparison), not the checksums computed meanwhile.

Then, per layout and bucket size (median of the rounds, spread in brackets):
  - end-to-end: the driver's wall time of one sync (``ray.get`` on all sends and receives),
  - transfer:   receive time inside each vLLM worker (all broadcasts of the version, slowest
                worker; it includes waiting for the learner to pack each bucket), against the
                raw receivers' time for the same broadcasts,
  - reload:     vLLM's ``reload_weights`` (+ tied-layer refresh) in the slowest worker.
Rounds of the spine and the baseline alternate, so outside load hits both alike.

Run from the repository root:  python bench/bench_weight_sync.py  (see --help)
"""

from __future__ import annotations

import argparse
import os
import socket
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=768, help="tiny Qwen2 hidden size (head_dim 64)")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--model", default=None, help="use this model directory instead of building a tiny one")
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[16, 64, 256],
                   help="bucket sizes to try (MiB); 64 is learner.weight_sync_bucket_mb's default")
    p.add_argument("--max-workers", type=int, default=2, help="measure fleets of 1..this many workers")
    p.add_argument("--rounds", type=int, default=5, help="timed syncs per row (after one warm-up sync)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--backend", default="gloo", help="side-group backend (gloo on CPU, nccl on GPU)")
    p.add_argument("--kv-cache-gb", type=int, default=1)
    p.add_argument("--pin-workers", action="store_true",
                   help="experiment: bind vLLM worker i's compute threads to core i "
                        "(VLLM_CPU_OMP_THREADS_BIND, with VLLM_ENABLE_V1_MULTIPROCESSING=1, which vLLM's "
                        "binding needs); by default a worker's model runs in its engine core, unbound")
    p.add_argument("--probe-wait", action="store_true",
                   help="rollout.verify_probe_wait: the sync waits for the workers' log-prob probe (by default "
                        "it is checked at the next sync)")
    p.add_argument("--no-verify", action="store_true",
                   help="sync without the check after the reload (rollout.verify_weights: false); by default "
                        "the spine verifies, as fleetrl does, and the verify columns give its cost")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class RawPeer:
    """One end of the baseline: joins a side group and broadcasts preallocated flat tensors."""

    def __init__(self, rank: int, numels: list[int], dtype: str):
        import torch

        self.rank = rank
        make = torch.randn if rank == 0 else torch.empty
        self.flats = [make(n, dtype=getattr(torch, dtype)) for n in numels]
        self.group = None

    def join(self, host: str, port: int, world_size: int, backend: str) -> int:
        from fleetrl.core.weight_wire import init_side_group

        self.group = init_side_group(host, port, self.rank, world_size, backend)
        return self.rank

    def run(self, count: int, fresh: bool = False) -> float:
        """Broadcast the first ``count`` buffers (one bucket layout); seconds inside this process.

        ``fresh``: like the spine, every bucket goes through a newly allocated buffer (the sender
        copies its data in first, the receivers allocate before receiving).
        """
        import torch

        from fleetrl.core.weight_wire import broadcast

        t0 = time.perf_counter()
        for flat in self.flats[:count]:
            if fresh:
                buf = torch.empty(flat.numel(), dtype=flat.dtype)
                if self.rank == 0:
                    buf.copy_(flat)
                flat = buf
            broadcast(self.group, flat, src=0)
        return time.perf_counter() - t0


_TIMELINE = ("learner call", "first bucket on the wire", "learner done", "worker call", "receive starts",
             "reload done", "worker done")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(learner, fleet, sync, raw_actors, plan, rounds: int, version: int):
    """Alternate spine syncs and raw broadcasts of ``plan``'s buckets; Samples per kind and field."""
    import ray

    from _util import Samples

    verify = fleet.cfg.verify_weights

    def spine() -> dict[str, float]:
        nonlocal version
        version += 1
        sync._plan = plan  # this row's bucket layout (fleetrl's own sync takes the learner's default)
        failed = sync.verify_failed
        start = time.perf_counter()
        sync.push(version)  # what fleetrl's loop runs: send, receive + reload, checksums, log-prob probe
        wall = time.perf_counter() - start
        if sync.verify_failed != failed:
            raise RuntimeError(f"the bench's sync of version {version} did not verify at once")
        learner_refs, fleet_refs = sync.last_refs
        got = ray.get(learner_refs + fleet_refs)  # finished already
        pending = sync._pending_probe  # the workers' probe, checked at the next push: let it end here,
        if pending is not None:        # outside the timing, so that it does not overlap the next round
            ray.wait(pending.refs + pending.learner_refs, num_returns=len(pending.refs) + len(pending.learner_refs))
        reports = got[learner.num_ranks:]
        ranks = [r for w in reports for r in w["ranks"]]
        slowest = max(reports, key=lambda w: w["seconds"])
        rank = max(slowest["ranks"], key=lambda r: r["t_reload_end"])
        # The floor's reload: one more reload of the same weights, all in memory already (nothing to
        # overlap), timed inside each worker; the spine's own reload runs while buckets arrive.
        full = max(ray.get([fleet.book.handle(i).time_reload.remote() for i in fleet.indices()]))
        sent = got[0]
        # Timeline (CLOCK_MONOTONIC is one clock for every process of this node): ms after push().
        timeline = {"learner call": sent["t_start"], "first bucket on the wire": sent["t_first_sent"],
                    "learner done": sent["t_end"], "worker call": slowest["t_start"],
                    "receive starts": rank["t_receive_start"], "reload done": rank["t_reload_end"],
                    "worker done": slowest["t_end"]}
        return {"wall": wall, "full_reload": full, "send": sent["seconds"],
                "recv": max(r["receive_s"] for r in ranks),
                "reload": max(r["reload_s"] for r in ranks),
                # On the critical path (WeightSync.verify_s): the learner's wait for its checksums after
                # its last broadcast (computed during it), the workers' read-back, the comparison.
                "verify": sync.verify_s if verify else 0.0,
                # The probe's time on the critical path: the comparison of the last version's probe and
                # the start of this one's (the learner and the workers score it after the sync), or
                # all of it with rollout.verify_probe_wait.
                "probe": sync.probe_s if verify and sync.probe_ids else 0.0,
                "checksum": sent.get("checksum_s", 0.0), "worker": slowest["seconds"],
                **{f"phase_{k}": v for k, v in slowest["phases_s"].items()},
                "rpc_rest": slowest["phases_s"]["load"] - max(r["receive_s"] + r["reload_s"] + r.get("verify_s", 0.0)
                                                              for r in ranks),
                **{f"at {k}": t - start for k, t in timeline.items()}}

    def raw(fresh: bool) -> dict[str, float]:
        start = time.perf_counter()
        secs = ray.get([a.run.remote(len(plan.buckets), fresh) for a in raw_actors])
        return {"wall": time.perf_counter() - start, "recv": max(secs[1:])}

    kinds = {"spine": spine, "raw": lambda: raw(False), "fresh": lambda: raw(True)}
    for fn in kinds.values():  # warm-up
        fn()
    got: dict[str, dict[str, Samples]] = {k: {} for k in kinds}
    names = list(kinds)
    for r in range(rounds):
        for k in names[r % 3:] + names[:r % 3]:  # rotate the order each round
            for field, v in kinds[k]().items():
                got[k].setdefault(field, Samples()).add(v)
    return got, version


def alloc_probe(numel: int, bucket_mbs: list[int], rounds: int) -> list[list[str]]:
    """In this process: copying ``numel`` fp32 values into fresh buffers of each bucket size (what both
    ends of the spine do every sync) vs into one reused buffer. Big buffers come from mmap and are
    page-faulted again on every allocation; small ones are recycled by the allocator."""
    import torch

    from _util import Samples

    src = torch.randn(numel)
    reused = torch.empty(numel)
    reused.copy_(src)
    rows = []
    for mb in bucket_mbs:
        chunk = max(1, min(numel, mb * 2**20 // 4))
        fresh, again = Samples(), Samples()
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            for off in range(0, numel, chunk):
                buf = torch.empty(min(chunk, numel - off))
                buf.copy_(src[off:off + buf.numel()])
                del buf
            t1 = time.perf_counter()
            reused.copy_(src)
            t2 = time.perf_counter()
            if r:  # the first round warms the allocator up
                fresh.add(t1 - t0), again.add(t2 - t1)
        rows.append([f"{mb}", _ms(fresh), _ms(again), f"{fresh.median / again.median:.1f}"])
    return rows


def _bw(s, mib: float):
    from _util import Samples

    return Samples(mib / v for v in s.values)


def _ratio(a, b) -> str:
    """Bandwidth ratio a/b of the same bytes = time ratio b/a."""
    return f"{b.median / a.median:.2f}"


def _ms(s) -> str:
    return f"{1e3 * s.median:.0f} ({1e3 * min(s.values):.0f}-{1e3 * max(s.values):.0f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from _util import bench_model, init_local_ray, model_info, pinned, print_machine_state, print_table

    before = print_machine_state("start")
    model = args.model or bench_model(args.hidden_size, args.num_layers, seed=args.seed)
    info = model_info(model) if args.model is None else {}
    print(f"model: {model} ({info.get('num_parameters', '?')} parameters, hidden {info.get('hidden_size')}, "
          f"{info.get('num_layers')} layers)", flush=True)

    init_local_ray()
    import ray

    from fleetrl.learner.config import LearnerConfig
    from fleetrl.learner.group import LearnerGroup
    from fleetrl.online.weights import WeightSync
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.fleet import RolloutFleet

    t0 = time.perf_counter()
    rcfg = RolloutConfig(num_workers=1, device="cpu", max_model_len=256, dtype="float32", enforce_eager=True,
                         cpu_kvcache_space_gb=args.kv_cache_gb, env_vars={"VLLM_LOGGING_LEVEL": "WARNING"},
                         verify_weights=not args.no_verify, verify_probe_wait=args.probe_wait)
    fleet = RolloutFleet(pinned(rcfg, 0) if args.pin_workers else rcfg, model, name_prefix="bench-wsync/")
    learner = None
    raw_actors: list = []
    try:
        learner = LearnerGroup(LearnerConfig(zero_stage=args.zero_stage, lr=1e-5, micro_batch_size=1,
                                             reference=False, loss={"kl_coef": 0.0}),
                               model, total_steps=1, mini_batch_size=1, name_prefix="bench-wsync/")
        fleet.wait_ready()
        print(f"learner and fleet ready in {time.perf_counter() - t0:.1f}s", flush=True)
        base = learner.weight_plan(0)
        plans = {mb: learner.weight_plan(0, bucket_mb=mb) for mb in args.bucket_mb}
        total_bytes = base.num_bytes
        mib = total_bytes / 2**20
        dtype = base.buckets[0].dtype
        if any(b.dtype != dtype for b in base.buckets):
            raise RuntimeError("the policy mixes dtypes; this bench's raw baseline assumes one dtype")

        alloc_rows = alloc_probe(sum(b.numel for b in base.buckets), args.bucket_mb, args.rounds)
        bw_rows, ms_rows, floor_rows, phase_rows, timeline_rows = [], [], [], [], []
        version = 0
        sync = None
        raw_cls = ray.remote(num_cpus=1)(RawPeer)
        for workers in range(1, args.max_workers + 1):
            while fleet.num_workers < workers:
                if args.pin_workers:  # worker i's engine computes on core i (see _util.pinned)
                    fleet.cfg = pinned(rcfg, fleet.num_workers)
                fleet.add_worker()
            fleet.wait_ready()
            # fleetrl's own sync (its side group rebuilt for this fleet), probing a fixed token list.
            if sync is None:
                sync = WeightSync(learner, fleet, args.backend)
                sync.probe_ids = list(range(1, rcfg.verify_probe_tokens + 1))
            else:
                sync.connect()
            world = fleet.weight_group_world_size()
            for mb in args.bucket_mb:
                plan = plans[mb]
                nb = len(plan.buckets)
                # A raw group per bucket layout: one sender + one receiver per vLLM worker.
                for a in raw_actors:
                    ray.kill(a)
                raw_actors = [raw_cls.remote(r, [b.numel for b in plan.buckets], dtype) for r in range(world)]
                rport = free_port()
                ray.get([a.join.remote("127.0.0.1", rport, world, args.backend) for a in raw_actors])

                got, version = measure(learner, fleet, sync, raw_actors, plan, args.rounds, version)
                sp, rw, fr = got["spine"], got["raw"], got["fresh"]
                # The least a sync must do, measured in this run: the raw broadcast of the same buckets
                # plus one vLLM reload of them (time_reload: a whole reload from memory, slowest worker).
                floor = rw["wall"].median + sp["full_reload"].median
                floor_rows.append([f"{workers}", f"{mb}", _ms(sp["wall"]), _ms(rw["wall"]), _ms(sp["full_reload"]),
                                   f"{1e3 * floor:.0f}", f"{floor / sp['wall'].median:.2f}",
                                   f"{sp['verify'].median / sp['wall'].median:.1%}",
                                   f"{sp['probe'].median / sp['wall'].median:.1%}"])
                timeline_rows.append([f"{workers}", f"{mb}", _ms(sp["wall"])]
                                     + [f"{1e3 * sp[k].median:.0f}" for k in sp if k.startswith("at ")])
                phase_rows.append([f"{workers}", f"{mb}", _ms(sp["wall"]),
                                   f"{1e3 * (sp['wall'].median - sp['worker'].median):.0f}", _ms(sp["worker"]),
                                   _ms(sp["phase_pause"]), _ms(sp["recv"]), _ms(sp["reload"]), _ms(sp["rpc_rest"]),
                                   _ms(sp["phase_reset"]), _ms(sp["phase_resume"])])
                bw_rows.append([f"{workers}", f"{mb}", f"{nb}",
                                _bw(sp["wall"], mib).fmt(0), _bw(rw["wall"], mib).fmt(0),
                                _ratio(sp["wall"], rw["wall"]),
                                _bw(sp["recv"], mib).fmt(0), _bw(rw["recv"], mib).fmt(0),
                                _ratio(sp["recv"], rw["recv"]),
                                _bw(fr["recv"], mib).fmt(0), _ratio(sp["recv"], fr["recv"])])
                ms_rows.append([f"{workers}", f"{mb}", _ms(sp["wall"]), _ms(sp["send"]), _ms(sp["recv"]),
                                _ms(sp["reload"]), f"{sp['reload'].median / sp['wall'].median:.0%}",
                                _ms(rw["wall"]), _ms(fr["wall"]), _ms(sp["verify"]), _ms(sp["probe"]),
                                f"{sp['verify'].median / sp['wall'].median:.1%}", _ms(sp["checksum"])])
                print(f"  {workers} worker(s), {mb} MiB buckets done", flush=True)
    finally:
        for a in raw_actors:
            ray.kill(a)
        fleet.shutdown()
        if learner is not None:
            learner.shutdown()
    after = print_machine_state("end")
    binding = "pinned to cores 0, 1, ... (mp executor)" if args.pin_workers else "unbound (fleetrl default)"
    setup = (f"{mib:.1f} MiB ({info.get('num_parameters', '?')} fp32 parameters) per sync, backend "
             f"{args.backend}, vLLM workers {binding}, "
             f"{args.rounds} rounds per row, median (min-max); load avg start {before['loadavg_1_5_15']}, "
             f"end {after['loadavg_1_5_15']}")
    print_table(
        ["workers", "bucket MiB", "spine e2e ms", "raw broadcast ms", "vLLM whole reload ms", "raw + reload ms",
         "ratio (raw + reload) / spine", "checksum check share", "log-prob probe share"],
        floor_rows, title=f"Weight sync vs the least it must do (raw broadcast + one reload, same run): {setup}")
    print_table(
        ["workers", "bucket MiB", "spine e2e ms", "outside the worker ms (Ray calls, driver)", "worker actor ms",
         "pause ms", "receive ms", "reload ms", "rest of the rpc ms (dispatch, plan)",
         "prefix-cache reset ms",
         "resume ms"],
        phase_rows, title="Where a sync's time goes (slowest worker, medians; e2e - worker = outside the worker)")
    print_table(["workers", "bucket MiB", "spine e2e ms"] + [f"{k} ms" for k in _TIMELINE], timeline_rows,
                title="Timeline of a sync: ms after the driver's push() (medians; slowest worker; one clock "
                      "for every process of this node)")
    print_table(
        ["workers", "bucket MiB", "buckets", "spine e2e MiB/s", "raw e2e MiB/s", "e2e ratio",
         "spine transfer MiB/s", "raw transfer MiB/s", "transfer ratio", "raw fresh-buffer transfer MiB/s",
         "transfer ratio vs fresh"],
        bw_rows, title=f"Weight sync bandwidth: {setup}")
    print_table(
        ["workers", "bucket MiB", "spine e2e ms", "learner send ms", "vLLM receive ms", "vLLM reload ms",
         "reload share", "raw e2e ms", "raw fresh-buffer e2e ms", "checksum check ms", "log-prob probe ms",
         "checksum check share",
         "learner checksums ms (in a thread, during the broadcast)"],
        ms_rows, title="Weight sync time per sync (same run)")
    print_table(["bucket MiB", "fresh buffers + copy ms", "reused buffer copy ms", "ratio"], alloc_rows,
                title=f"Allocation probe in the driver: copying {mib:.1f} MiB into fresh buffers of each "
                      "bucket size (as both ends of the spine do per sync) vs into one reused buffer")


if __name__ == "__main__":
    main()
