"""The learner's train phase against the math it does, and packed against padded batches.

One invocation, per thread count T (``--threads``):

- **plain torch**: in this process, ``torch.set_num_threads(T)``, the model from
  ``AutoModelForCausalLM``, one forward over the padded batch, the GRPO/PPO loss of
  ``fleetrl.algos``, backward, grad clipping, AdamW step. The baseline: the math and nothing else.
- **Learner in-process**: ``fleetrl.learner.rank.Learner`` (DeepSpeed, one rank) built here, same
  batch: what the learner class adds around the math.
- **LearnerGroup (Ray)**: the rank as a Ray actor with ``learner.num_cpus_per_rank=T``, timed
  from the driver around ``LearnerGroup.train`` (what the loop's ``time/train`` measures: batch
  transfer included).
- **mixed lengths**: a GRPO batch whose prompts and completions vary in length, trained padded
  (``learner.pack_samples=false``) and packed (``true``) by Ray learner groups; padding share =
  padded positions / all positions the forward sees.

Rows compared with each other run interleaved, round by round with a rotating order (warm-up
rounds first, then ``--steps`` timed rounds); the median is reported with min-max.
Run from the repository root:  python bench/bench_learner.py  (see --help)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--completion", type=int, default=32, help="completion tokens (uniform workload)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--skip-mixed", action="store_true")
    return p.parse_args(argv)


def grpo_batch(rows: int, prompt_lens: list[int], completion_lens: list[int], vocab: int,
               seed: int = 0) -> dict:
    """A right-padded GRPO train batch (as ``fleetrl.online.batch.pad_samples`` lays it out)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    T = max(p + c for p, c in zip(prompt_lens, completion_lens))
    ids = torch.zeros(rows, T, dtype=torch.long)
    attn = torch.zeros(rows, T, dtype=torch.long)
    loss_mask = torch.zeros(rows, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        ids[i, : p + c] = torch.randint(3, vocab, (p + c,), generator=g)
        attn[i, : p + c] = 1
        loss_mask[i, p : p + c] = 1
    old = -torch.rand(rows, T, generator=g) * 5 * attn
    adv = torch.randn(rows, generator=g)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
            "old_logprobs": old.float(), "advantages": adv}


def learner_cfg(args, threads: int, micro: int, pack: bool) -> dict:
    return {"num_ranks": 1, "num_cpus_per_rank": threads, "zero_stage": args.zero_stage, "lr": 1e-4,
            "micro_batch_size": micro, "reference": False, "pack_samples": pack,
            "loss": {"kl_coef": 0.0}}


def time_interleaved(fns: list, warmup: int, steps: int) -> list:
    """Samples per step function, run round by round with the order rotating each round, so a
    burst of outside load hits every row alike."""
    from _util import Samples

    for _ in range(warmup):
        for fn in fns:
            fn()
    out = [Samples() for _ in fns]
    for r in range(steps):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            out[i].add(time.perf_counter() - t0)
    return out


def plain_torch(model_path: str, batch: dict, threads: int, args):
    """The baseline: forward + loss + backward + clip + AdamW, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM

    from fleetrl.algos import ppo  # noqa: F401  (registers "ppo")
    from fleetrl.algos.logprobs import token_logprobs
    from fleetrl.algos.registry import POLICY_LOSSES

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = POLICY_LOSSES.get("ppo")
    attn = batch["attention_mask"]
    mask = (batch["loss_mask"] * attn).float()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)

    def step():
        logits = model(input_ids=batch["input_ids"], attention_mask=attn, position_ids=pos,
                       use_cache=False).logits
        logp = token_logprobs(logits, batch["input_ids"]) * attn
        loss, _ = loss_fn(logp, batch["old_logprobs"], batch["advantages"], mask, clip_low=0.2,
                          clip_high=0.2, dual_clip=None, agg="token-mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def with_threads():  # the Learner in-process shares this process: its count is the same T
        torch.set_num_threads(threads)
        step()

    return with_threads


def in_process_learner(model_path: str, batch: dict, threads: int, args):
    import torch

    from fleetrl.learner.deepspeed_utils import free_port
    from fleetrl.learner.rank import Learner

    n = batch["input_ids"].shape[0]
    learner = Learner(learner_cfg(args, threads, n, False), model_path, 0, 1, "127.0.0.1", free_port(),
                      None, n)

    def step():
        torch.set_num_threads(threads)
        learner.train(batch, n)

    return step


def ray_learner(model_path: str, batch: dict, threads: int, args, pack: bool):
    from fleetrl.learner.group import LearnerGroup

    n = batch["input_ids"].shape[0]
    group = LearnerGroup(learner_cfg(args, threads, n, pack), model_path, mini_batch_size=n,
                         name_prefix=f"bench-t{threads}-p{int(pack)}-")
    return group, (lambda: group.train(batch, n)), group.rank_info[0]


def main(argv=None) -> None:
    import random

    from _util import bench_model, init_local_ray, model_info, print_machine_state, print_table
    from fleetrl.learner.packing import padding_share

    args = parse_args(argv)
    start = print_machine_state("start")
    model_path = bench_model(args.hidden, args.layers)
    vocab = int(model_info(model_path).get("vocab_size", 512))
    rows = args.prompts * args.group_size
    uniform = grpo_batch(rows, [13] * rows, [args.completion] * rows, vocab)
    rnd = random.Random(0)
    prompt_lens = [p for p in (rnd.randint(6, 24) for _ in range(args.prompts)) for _ in range(args.group_size)]
    mixed = grpo_batch(rows, prompt_lens, [rnd.randint(2, 64) for _ in range(rows)], vocab, seed=1)

    init_local_ray(num_cpus=8)
    table = []
    inproc = None
    for t in args.threads:
        steps = [plain_torch(model_path, uniform, t, args)]
        if inproc is None:  # DeepSpeed initializes the driver's process group once
            inproc = in_process_learner(model_path, uniform, t, args)
            steps.append(inproc)
        group, ray_step, info = ray_learner(model_path, uniform, t, args, pack=False)
        steps.append(ray_step)
        try:
            samples = time_interleaved(steps, args.warmup, args.steps)
        finally:
            group.shutdown()
        base = samples[0]
        labels = ["plain torch step"] + (["Learner in-process (DeepSpeed, no Ray)"] if len(steps) == 3 else [])
        labels.append(f"LearnerGroup.train (Ray, {info.get('torch_threads', '?')} threads, "
                      f"nice {info.get('niceness', '?')})")
        for k, (label, smp) in enumerate(zip(labels, samples)):
            table.append([t, f"uniform {rows}x{uniform['input_ids'].shape[1]}" if k == 0 else "", label,
                          smp.fmt(3), f"{smp.spread_pct:.0f}%", f"{smp.median / base.median:.2f}"])
        if args.skip_mixed:
            continue
        shares = {p: padding_share(mixed["attention_mask"], pack=p) for p in (False, True)}
        groups = [ray_learner(model_path, mixed, t, args, pack=p) for p in (False, True)]
        try:
            padded, packed = time_interleaved([g[1] for g in groups], args.warmup, args.steps)
        finally:
            for g in groups:
                g[0].shutdown()
        table.append([t, f"mixed {rows}x{mixed['input_ids'].shape[1]}",
                      f"LearnerGroup padded (padding {shares[False]:.0%})", padded.fmt(3),
                      f"{padded.spread_pct:.0f}%", "1.00"])
        table.append([t, "", f"LearnerGroup packed (padding {shares[True]:.0%})", packed.fmt(3),
                      f"{packed.spread_pct:.0f}%", f"{packed.median / padded.median:.2f}"])
    end = print_machine_state("end")
    print_table(["threads", "batch", "row", "s/step median (min-max)", "spread", "ratio vs first row"],
                [[str(c) for c in r] for r in table],
                title=(f"Learner train step, Qwen2 hidden {args.hidden} x {args.layers} layers, "
                       f"ZeRO-{args.zero_stage}, {args.steps} timed steps after {args.warmup} warm-up; "
                       f"load avg start {start['loadavg_1_5_15']}, end {end['loadavg_1_5_15']}"))


if __name__ == "__main__":
    main()
