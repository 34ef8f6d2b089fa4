"""LoRA vs full fine-tuning of the same model, in one run: learner memory and weight-sync cost.

For each mode (full; LoRA r=--rank on every linear layer) it starts a real ``LearnerGroup`` (1
DeepSpeed rank, ZeRO-2, a Ray actor) with the KL reference on, takes one optimizer step, and reads
``Engine.memory()``: parameter bytes (policy + a separate reference copy, which LoRA does not
load) and optimizer-state bytes. Then it syncs to one real vLLM CPU worker (``WeightSync.push``)
--rounds times: bytes per sync (the plan) and the driver's wall time per sync (median [min-max]).
With LoRA only the adapter travels and the worker merges it into its base weights and reloads
the whole model (rollout.lora_sync: merged), so the reload part does not shrink.

Run from the repository root:  python bench/bench_lora.py  (see --help)
"""

from __future__ import annotations

import argparse
import statistics
import sys
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
    fleet = RolloutFleet(RolloutConfig(num_workers=1, max_model_len=256, enforce_eager=True, cpu_kvcache_space_gb=1,
                                       dtype="float32", env_vars={"VLLM_LOGGING_LEVEL": "WARNING"}),
                         model, name_prefix="bench-lora/")
    fleet.wait_ready()
    rows = [Sample(0, "", [5, 17, 42, 99], [7, 7, 120, 3], [0.0] * 4, "stop", 0)] * 2
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
                sync = WeightSync(learner, fleet, backend="gloo")
                plan_bytes = learner.weight_plan(0).num_bytes
                sync.push(1)  # warm-up (the LoRA worker reads its base weights here once)
                times = [sync.push(v) for v in range(2, 2 + args.rounds)]
                results[mode] = {**mem, "sync_bytes": plan_bytes, "sync_s": times}
            finally:
                learner.shutdown()
    finally:
        fleet.shutdown()

    report(results)


def report(results: dict) -> None:
    full, lora = results["full"], results["lora"]
    print(f"\n{'':28s}{'full':>16s}{'LoRA':>16s}{'LoRA / full':>14s}")
    for key, label in (("param_bytes", "parameters (+reference)"), ("trainable_bytes", "trainable parameters"),
                       ("optimizer_bytes", "optimizer state"), ("sync_bytes", "bytes per sync")):
        print(f"{label:28s}{_mib(full[key]):>16s}{_mib(lora[key]):>16s}{lora[key] / full[key]:>14.4f}")
    learner_mem = {m: r["param_bytes"] + r["optimizer_bytes"] for m, r in results.items()}
    print(f"{'learner memory (params+opt)':28s}{_mib(learner_mem['full']):>16s}{_mib(learner_mem['lora']):>16s}"
          f"{learner_mem['lora'] / learner_mem['full']:>14.4f}")
    if "sync_s" not in full:
        return
    med = {m: statistics.median(r["sync_s"]) for m, r in results.items()}
    spread = {m: f"[{min(r['sync_s']) * 1e3:.0f}-{max(r['sync_s']) * 1e3:.0f}]" for m, r in results.items()}
    print(f"{'sync time, median [min-max]':28s}{med['full'] * 1e3:>9.0f} ms {spread['full']:>5s}"
          f"{med['lora'] * 1e3:>7.0f} ms {spread['lora']}  ratio {med['lora'] / med['full']:.2f}")


if __name__ == "__main__":
    main()
