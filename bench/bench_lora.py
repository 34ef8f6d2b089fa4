"""LoRA vs full fine-tuning of the same model, in one run: learner memory and weight-sync cost.

For each learner (full; LoRA r=--rank on every linear layer) it starts a real ``LearnerGroup`` (1
DeepSpeed rank, ZeRO-2, a Ray actor) with the KL reference on, takes one optimizer step, and reads
``Engine.memory()``: parameter bytes (policy + a separate reference copy, which LoRA does not
load) and optimizer-state bytes. Then it syncs to a real vLLM CPU worker (``WeightSync.push``)
--rounds times: bytes per sync (the plan) and the driver's wall time per sync (median [min-max]),
then times --rounds generate calls (8 prompts x 4 samples x 32 tokens) on what the worker serves.
The LoRA learner syncs twice over: to a plain engine that merges the adapter into its base weights
and reloads the whole model (rollout.lora_sync: merged), and to an engine started with vLLM's
enable_lora that serves each version as an adapter, no reload (rollout.lora_sync: adapter).

Run from the repository root:  python bench/bench_lora.py  (see --help)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512, help="tiny Qwen2 hidden size (head_dim 64)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--rounds", type=int, default=5, help="timed syncs per mode (after one warm-up sync)")
    p.add_argument("--bytes-only", action="store_true",
                   help="no Ray, vLLM or DeepSpeed: the same byte counts from plain torch (AdamW step) and "
                        "the weight plan, without sync times")
    return p.parse_args(argv)


def bytes_only(model_path: str, rank: int) -> dict[str, dict[str, int]]:
    """Parameter (+ a reference copy for full), trainable, optimizer-state and sync bytes, in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from fleetrl.core.weight_wire import plan_buckets
    from fleetrl.learner.lora import LoraConfig, adapter_tensors, apply_lora

    def nbytes(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    out = {}
    for mode in ("full", "lora"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if mode == "lora":
            model = apply_lora(model, LoraConfig(r=rank, alpha=2 * rank))
            sent = adapter_tensors(model)
            params = nbytes(model.parameters())  # base + adapter; the reference is the same model
        else:
            params = 2 * nbytes(model.parameters())  # + the frozen reference copy a KL run loads
            sent = dict(model.named_parameters())
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        ids = torch.randint(0, 100, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state = [t for st in opt.state.values() for t in st.values() if t.dim() > 0]
        plan = plan_buckets([(n, tuple(p.shape), p.dtype) for n, p in sent.items()], 0)
        out[mode] = {"param_bytes": params, "trainable_bytes": nbytes(trainable), "optimizer_bytes": nbytes(state),
                     "sync_bytes": plan.num_bytes}
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> None:
    args = parse_args(argv)
    from _util import bench_model, init_local_ray

    if args.bytes_only:
        model = bench_model(args.hidden_size, args.num_layers)
        print(f"model: tiny Qwen2 hidden {args.hidden_size}, {args.num_layers} layers, float32; LoRA r={args.rank} "
              f"alpha={2 * args.rank} all-linear; plain torch AdamW (no DeepSpeed), bytes only")
        report(bytes_only(model, args.rank))
        return
    init_local_ray()
    import torch

    from fleetrl.learner.config import LearnerConfig
    from fleetrl.learner.group import LearnerGroup
    from fleetrl.online.batch import Sample, pad_samples
    from fleetrl.online.weights import WeightSync
    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.fleet import RolloutFleet

    model = bench_model(args.hidden_size, args.num_layers)
    from safetensors.torch import load_file

    n_params = sum(t.numel() for t in load_file(str(next(Path(model).glob("*.safetensors")))).values())
    print(f"model: tiny Qwen2 hidden {args.hidden_size}, {args.num_layers} layers, {n_params / 1e6:.2f}M params, "
          f"float32; LoRA r={args.rank} alpha={2 * args.rank} all-linear")
    def rollout(mode: str) -> RolloutConfig:
        return RolloutConfig(num_workers=1, max_model_len=256, enforce_eager=True, cpu_kvcache_space_gb=1,
                             dtype="float32", lora_sync=mode, env_vars={"VLLM_LOGGING_LEVEL": "WARNING"})

    fleet = RolloutFleet(rollout("merged"), model, name_prefix="bench-lora/")
    adapter_fleet = RolloutFleet(rollout("adapter"), model, name_prefix="bench-lora-adapter/", lora_rank=args.rank)
    fleet.wait_ready()
    adapter_fleet.wait_ready()
    rows = [Sample(0, "", [5, 17, 42, 99], [7, 7, 120, 3], [0.0] * 4, "stop", 0)] * 2
    prompts = [[5 + i, 17, 42, 99, 7 + i] for i in range(8)]

    def generate_s(f: RolloutFleet) -> list[float]:
        import ray

        worker = f.book.handle(f.book.indices()[0])
        times = []
        for r in range(args.rounds + 1):  # the first one after a sync warms up
            t0 = time.perf_counter()
            ray.get(worker.generate.remote(prompts, 4, {"max_tokens": 32, "ignore_eos": True},
                                           [f"g{r}-{i}" for i in range(len(prompts))]))
            times.append(time.perf_counter() - t0)
        return times[1:]

    results = {}
    try:
        for mode in ("full", "lora"):
            lora = {"r": args.rank, "alpha": 2 * args.rank} if mode == "lora" else None
            learner = LearnerGroup(LearnerConfig(zero_stage=2, lr=1e-4, micro_batch_size=2, lora=lora,
                                                 loss={"kl_coef": 0.01}),
                                   model, total_steps=1, mini_batch_size=2, name_prefix=f"bench-lora-{mode}/")
            try:
                batch = pad_samples(rows, pad_id=0)
                batch["old_logprobs"] = learner.compute_logprobs(batch) * batch["loss_mask"]
                batch["ref_logprobs"] = learner.compute_logprobs(batch, "reference")
                batch["advantages"] = torch.tensor([1.0, -1.0])
                learner.train(batch, mini_batch_size=2)
                mem = learner.memory()[0]
                plan_bytes = learner.weight_plan(0).num_bytes
                for name, f in [("full", fleet)] if mode == "full" else [("merged", fleet), ("adapter", adapter_fleet)]:
                    sync = WeightSync(learner, f, backend="gloo")
                    sync.push(1)  # warm-up (a merged worker reads its base weights here once)
                    times = [sync.push(v) for v in range(2, 2 + args.rounds)]
                    results[name] = {**mem, "sync_bytes": plan_bytes, "sync_s": times, "generate_s": generate_s(f)}
            finally:
                learner.shutdown()
    finally:
        fleet.shutdown()
        adapter_fleet.shutdown()

    report(results)


def report(results: dict) -> None:
    """One column per mode (full first), the ratio of each to full."""
    modes = list(results)
    full = results["full"]
    label = {"full": "full", "lora": "LoRA", "merged": "LoRA merged", "adapter": "LoRA adapter"}
    print("\n" + f"{'':28s}" + "".join(f"{label[m]:>16s}" for m in modes)
          + "".join(f"{label[m] + ' / full':>22s}" for m in modes[1:]))

    def row(name: str, values: dict[str, float], fmt) -> None:
        print(f"{name:28s}" + "".join(f"{fmt(values[m]):>16s}" for m in modes)
              + "".join(f"{values[m] / values['full']:>22.4f}" for m in modes[1:]))

    for key, name in (("param_bytes", "parameters (+reference)"), ("trainable_bytes", "trainable parameters"),
                      ("optimizer_bytes", "optimizer state"), ("sync_bytes", "bytes per sync")):
        row(name, {m: r[key] for m, r in results.items()}, _mib)
    row("learner memory (params+opt)", {m: r["param_bytes"] + r["optimizer_bytes"] for m, r in results.items()},
        _mib)
    if "sync_s" not in full:
        return
    for key, name in (("sync_s", "sync time, median"), ("generate_s", "generate 8x4x32, median")):
        row(name, {m: statistics.median(r[key]) for m, r in results.items()}, lambda s: f"{s * 1e3:.0f} ms")
        print(f"{'  [min-max]':28s}" + "".join(
            f"{f'[{min(r[key]) * 1e3:.0f}-{max(r[key]) * 1e3:.0f}]':>16s}" for r in results.values()))


if __name__ == "__main__":
    main()
