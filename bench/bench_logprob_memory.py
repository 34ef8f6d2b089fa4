"""The learner's peak memory and step time on a real vocabulary: chunked log-prob head vs whole logits.

Model: the built-in SmolLM2-135M-Instruct (``model.path: smollm2-135m``, vocab 49,152, fp32). Each row is
one fresh subprocess (this script with ``--child``) holding a ``fleetrl.learner.rank.Learner`` (DeepSpeed,
one rank, ZeRO-2, the GRPO ``ppo`` loss, reference off) and training one micro-batch of M rows per step:

- ``learner.logprob_chunk_tokens: 0``: the model's whole [tokens, vocab] fp32 logits, then log-softmax
  (what every learner did before the chunked head);
- ``learner.logprob_chunk_tokens: 1024`` (the default; others with ``--chunks``): the head and
  log-softmax run on 1024 tokens at a time, each chunk recomputed in backward, so no [tokens, vocab]
  tensor is held whole. A micro-batch of at most that many tokens is one chunk.

Memory: the process's peak RSS (``ru_maxrss``) after a warm-up step on M rows of 8 tokens (the optimizer
states and gradients then exist) and after the timed steps; "step peak" is their difference, the
memory the micro-batch itself needs. Time: median of ``--steps`` steps after that warm-up.
Run from the repository root:  python bench/bench_logprob_memory.py   (see --help)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shapes", nargs="+", default=["4x80", "8x80", "16x80", "4x512"],
                   help="micro-batch rows x tokens per row (80: the sums recipe's prompt + 32 tokens)")
    p.add_argument("--chunks", nargs="+", type=int, default=[0, 1024],
                   help="learner.logprob_chunk_tokens values to compare (0: whole logits, the baseline)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _batch(rows: int, tokens: int, vocab: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = min(48, tokens // 2)
    ids = torch.randint(3, vocab, (rows, tokens), generator=g)
    attn = torch.ones(rows, tokens, dtype=torch.long)
    loss_mask = torch.zeros(rows, tokens, dtype=torch.long)
    loss_mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
            "old_logprobs": -torch.rand(rows, tokens, generator=g) * 5, "advantages": torch.randn(rows, generator=g)}


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(spec: dict) -> dict:
    import torch

    from fleetrl.learner.deepspeed_utils import free_port
    from fleetrl.learner.rank import Learner

    torch.set_num_threads(spec["threads"])
    rows, tokens = spec["rows"], spec["tokens"]
    cfg = {"num_ranks": 1, "num_cpus_per_rank": spec["threads"], "zero_stage": 2, "lr": 1e-6,
           "micro_batch_size": rows, "reference": False, "loss": {"kl_coef": 0.0},
           "logprob_chunk_tokens": spec["chunk"]}
    learner = Learner(cfg, spec["model"], 0, 1, "127.0.0.1", free_port(), None, rows)
    vocab = json.loads((Path(spec["model"]) / "config.json").read_text())["vocab_size"]
    learner.train(_batch(rows, 8, vocab, seed=1), rows)  # optimizer states and gradients now exist
    base = _maxrss_mib()
    batch = _batch(rows, tokens, vocab)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        learner.train(batch, rows)
        times.append(time.perf_counter() - t0)
    return {"base_mib": base, "peak_mib": _maxrss_mib(), "times": times}


def main(argv=None) -> None:
    from _util import Samples, print_machine_state, print_table
    from fleetrl.run.runtime import resolve_model

    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    start = print_machine_state("start")
    model = resolve_model(args.model)
    chunks = [0, *sorted(set(args.chunks) - {0})]  # whole logits first: every row is a ratio to it
    table = []
    for shape in args.shapes:
        rows, tokens = (int(x) for x in shape.split("x"))
        logits_mib = rows * tokens * 49152 * 4 / 2**20
        results = {}
        for chunk in chunks:
            spec = {"model": model, "rows": rows, "tokens": tokens, "chunk": chunk, "steps": args.steps,
                    "threads": args.threads}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, timeout=1800)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"child {spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            results[chunk] = json.loads(line[len("RESULT "):])
        whole = results[0]
        for chunk in chunks:
            r = results[chunk]
            step_peak = r["peak_mib"] - r["base_mib"]
            t = Samples(r["times"])
            table.append([shape if chunk == 0 else "", f"{logits_mib:.0f}" if chunk == 0 else "",
                          "whole logits" if chunk == 0 else f"chunked ({chunk} tokens)",
                          f"{r['peak_mib']:.0f}", f"{step_peak:.0f}",
                          f"{step_peak / max(whole['peak_mib'] - whole['base_mib'], 1e-9):.2f}",
                          t.fmt(2), f"{t.median / Samples(whole['times']).median:.2f}"])
    end = print_machine_state("end")
    print_table(["rows x tokens", "one logits tensor MiB", "head", "peak RSS MiB", "step peak MiB",
                 "step peak vs whole", "s/step median (min-max)", "time vs whole"], table,
                title=f"Learner step on {args.model} (vocab 49,152, fp32, ZeRO-2, {args.threads} threads, "
                      f"{args.steps} timed steps); load avg start {start['loadavg_1_5_15']}, "
                      f"end {end['loadavg_1_5_15']}")


if __name__ == "__main__":
    main()
