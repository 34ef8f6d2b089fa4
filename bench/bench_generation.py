"""Generation throughput of the rollout fleet vs raw ``vllm.LLM.generate``, measured in one run.

Baseline: a ``vllm.LLM`` in this process with exactly a fleet worker's engine arguments
(``fleetrl.rollout.worker.engine_kwargs``: model, max_model_len, dtype, enforce_eager, seed,
logprobs mode; same KV cache size), given all prompts (token ids) in ONE ``LLM.generate`` call
with the SamplingParams the worker builds (``fleetrl.rollout.worker.sampling_params``: per-token
logprobs on, no detokenization). Two more rows on that engine: logprobs off, and the prompts in
calls of k one after the other (what small synchronous calls cost). One row drives a
``RolloutWorker`` (its ``AsyncLLM`` engine) in this process without Ray, one call per prompt
group, all in flight.

Fleet rows go through ``RolloutFleet`` (Ray actors, one vLLM ``AsyncLLM`` engine each) on the same
prompts and sampling, first with 1 worker, then with a 2nd worker added. Each fleet layout is
measured two ways: every worker gets one call with its share of the prompts ("1 call/worker": what
the transport costs), and the orchestrator's way, k prompts per call streamed while keeping the
fleet's idle capacity filled ("k prompts/call"; the orchestrator sends one group per call, and a
worker's engine batches all its calls in flight continuously).

``ignore_eos`` makes every completion exactly ``max_tokens`` long, so all rows generate the same
number of tokens. Rounds of all rows are interleaved (the order rotates each round) so that
load from other processes hits every row alike; the raw baseline is re-measured next to each
fleet layout and each ratio uses the baseline of its own phase.

Run from the repository root:  python bench/bench_generation.py  (see --help)
"""

from __future__ import annotations

import argparse
import os
import random
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=256, help="tiny Qwen2 hidden size (head_dim 64)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--model", default=None, help="use this model directory instead of building a tiny one")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 32), metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, drawn uniformly (seeded)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompts-per-call", type=int, default=1,
                   help="prompts per generate call in the streamed fleet rows (the orchestrator's "
                        "rl.prompts_per_request, 1 by default: one group per call)")
    p.add_argument("--max-inflight-per-worker", type=int, default=32)
    p.add_argument("--max-workers", type=int, default=2, help="measure fleets of 1..this many workers")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row (after one warm-up round)")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of every engine")
    p.add_argument("--omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for every engine (default: vLLM's own, 'auto')")
    p.add_argument("--pin-workers", action="store_true",
                   help="experiment: bind fleet worker i's compute threads to core i "
                        "(VLLM_CPU_OMP_THREADS_BIND, with VLLM_ENABLE_V1_MULTIPROCESSING=1, which vLLM's "
                        "binding needs); by default a worker's model runs in its engine core, unbound")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_prompts(num: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, never the 4 special tokens (ids 0..3 in the tiny tokenizer)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


class RawEngine:
    """The baseline: a ``vllm.LLM`` in this process with exactly a fleet worker's engine arguments
    (``fleetrl.rollout.worker.engine_kwargs``); ``generate`` calls ``LLM.generate`` directly."""

    def __init__(self, cfg, model_path: str):
        from vllm import LLM

        from fleetrl.rollout.config import worker_env
        from fleetrl.rollout.worker import engine_kwargs

        os.environ.update(worker_env(cfg, "cpu"))  # VLLM_CPU_KVCACHE_SPACE, as a worker sets it
        self.llm = LLM(**engine_kwargs(cfg, model_path))

    def generate(self, prompts, n: int, sampling: dict, logprobs: bool = True,
                 per_call: int | None = None) -> int:
        """Tokens generated; ``per_call``: that many prompts per ``generate``, one call after the other."""
        from vllm.inputs import TokensPrompt

        from fleetrl.rollout.worker import sampling_params

        params = sampling_params(sampling, n)
        if not logprobs:
            params.logprobs = None
        per_call = per_call or len(prompts)
        tokens = 0
        for i in range(0, len(prompts), per_call):
            chunk = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts[i:i + per_call]]
            outs = self.llm.generate(chunk, params, use_tqdm=False)
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        return tokens



def worker_generate(worker, prompts, n: int, sampling: dict) -> int:
    """``RolloutWorker.generate`` in this process, one call per prompt group, all in flight at once:
    the worker's own code around its AsyncLLM engine, without Ray."""
    futures = [worker.submit("generate", [p], n, sampling, [i]) for i, p in enumerate(prompts)]
    return sum(len(c.token_ids) for f in futures for c in f.result())


def fleet_one_call_per_worker(fleet, prompts, n: int, sampling: dict) -> int:
    import ray

    k = fleet.num_workers
    size = -(-len(prompts) // k)
    chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    refs = [fleet.submit(c, n, sampling, [f"{j}-{i}" for i in range(len(c))]) for j, c in enumerate(chunks)]
    got = ray.get(refs)
    for r in refs:
        fleet.on_done(r)
    return sum(len(c.token_ids) for comps in got for c in comps)


def fleet_streamed(fleet, prompts, n: int, sampling: dict, per_call: int) -> int:
    """Like fleetrl.online.collect.GroupCollector: keep idle capacity filled, collect as calls finish."""
    import ray

    todo = [prompts[i:i + per_call] for i in range(0, len(prompts), per_call)]
    pending, tokens, next_id = [], 0, 0
    while todo or pending:
        while todo and fleet.idle_capacity() > 0:
            chunk = todo.pop(0)
            pending.append(fleet.submit(chunk, n, sampling, list(range(next_id, next_id + len(chunk)))))
            next_id += len(chunk)
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            fleet.on_done(ref)
            tokens += sum(len(c.token_ids) for c in ray.get(ref))
    return tokens


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from _util import (
        Samples,
        bench_model,
        init_local_ray,
        model_info,
        pinned,
        print_machine_state,
        print_table,
    )
    from fleetrl.rollout.config import RolloutConfig

    before = print_machine_state("start")
    model = args.model or bench_model(args.hidden_size, args.num_layers, seed=args.seed)
    info = model_info(model) if args.model is None else {}
    vocab = info.get("tokenizer_vocab_size", 512)
    print(f"model: {model} ({info.get('num_parameters', '?')} parameters, hidden {info.get('hidden_size')}, "
          f"{info.get('num_layers')} layers)", flush=True)

    prompts = make_prompts(args.num_prompts, *args.prompt_len, vocab=vocab, seed=args.seed)
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens, "ignore_eos": True}
    expected = len(prompts) * args.n * args.max_tokens
    env = {"VLLM_LOGGING_LEVEL": "WARNING"}
    if args.omp_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    cfg = RolloutConfig(num_workers=1, device="cpu", max_model_len=args.max_model_len, dtype="float32",
                        enforce_eager=True, cpu_kvcache_space_gb=args.kv_cache_gb, seed=args.seed,
                        max_inflight_per_worker=args.max_inflight_per_worker, env_vars=env)

    t0 = time.perf_counter()
    raw = RawEngine(cfg, model)
    raw.generate(prompts, args.n, sampling)  # warm-up: the first generate of an engine is slow
    print(f"raw engine ready in {time.perf_counter() - t0:.1f}s", flush=True)
    from fleetrl.rollout.worker import InProcessWorker

    worker = InProcessWorker(cfg, model)  # warms up

    init_local_ray()
    from fleetrl.rollout.fleet import RolloutFleet

    t0 = time.perf_counter()
    fleet = RolloutFleet(pinned(cfg, 0) if args.pin_workers else cfg, model, name_prefix="bench-gen/")
    rows, results = [], {}
    try:
        for workers in range(1, args.max_workers + 1):
            while fleet.num_workers < workers:
                if args.pin_workers:
                    fleet.cfg = pinned(cfg, fleet.num_workers)
                fleet.add_worker()
            fleet.wait_ready()
            print(f"fleet of {workers} ready in {time.perf_counter() - t0:.1f}s", flush=True)
            modes = {
                "raw vllm.LLM.generate (1 call)": lambda: raw.generate(prompts, args.n, sampling),
                "raw, logprobs off": lambda: raw.generate(prompts, args.n, sampling, logprobs=False),
                f"raw, {args.prompts_per_call} prompts/call in turn": lambda: raw.generate(
                    prompts, args.n, sampling, per_call=args.prompts_per_call),
                "RolloutWorker in-process (no Ray), 1 group/call": lambda: worker_generate(
                    worker, prompts, args.n, sampling),
                f"fleet {workers}w, 1 call/worker": lambda: fleet_one_call_per_worker(
                    fleet, prompts, args.n, sampling),
                f"fleet {workers}w, {args.prompts_per_call} prompts/call": lambda: fleet_streamed(
                    fleet, prompts, args.n, sampling, args.prompts_per_call),
            }
            for fn in modes.values():  # warm-up round (the fleet's engines warmed up at start already)
                fn()
            tps = {name: Samples() for name in modes}
            names = list(modes)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    start = time.perf_counter()
                    tokens = modes[name]()
                    elapsed = time.perf_counter() - start
                    if tokens != expected:
                        raise RuntimeError(f"{name} generated {tokens} tokens, expected {expected}: "
                                           "ignore_eos did not hold, the rows are not comparable")
                    tps[name].add(tokens / elapsed)
            base = tps[names[0]].median
            for name in names:
                rows.append([f"{workers}", name, tps[name].fmt(0), f"{tps[name].spread_pct:.0f}%",
                             f"{tps[name].median / base:.2f}"])
            results[workers] = {k: v.values for k, v in tps.items()}
    finally:
        fleet.shutdown()
        worker.shutdown()
    after = print_machine_state("end")
    print_table(
        ["phase (workers)", "row", "tokens/s median (min-max)", "spread", "ratio vs raw (same phase)"],
        rows,
        title=(f"Generation: {len(prompts)} prompts x n={args.n} x {args.max_tokens} tokens "
               f"= {expected} tokens per round, {args.rounds} rounds per row, temperature "
               f"{args.temperature}, fp32, enforce_eager, max_model_len {args.max_model_len}, "
               f"KV cache {args.kv_cache_gb} GiB, OMP bind {args.omp_bind or 'auto (vLLM default)'}"
               f"{', fleet worker i pinned to core i' if args.pin_workers else ''}; "
               f"load avg start {before['loadavg_1_5_15']}, end {after['loadavg_1_5_15']}"),
    )


if __name__ == "__main__":
    main()
