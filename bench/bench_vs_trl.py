"""fleetrl against TRL's GRPOTrainer on the same GRPO workload, from one invocation.

Workload (both sides), by ``--task``: ``letters`` (default) is the tiny Qwen2 of ``model.path: tiny``,
the "letters" prompts of ``examples/data/letters_train.jsonl`` and the ``letter_fraction`` reward at
temperature 1.0; ``sums`` is the built-in SmolLM2-135M-Instruct (``model.path: smollm2-135m``), the
sums of ``examples/data/sums_train.jsonl`` and ``numeric_answer`` (the last number) at temperature
0.7, as ``examples/grpo_smollm2.yaml``. Prompts are rendered with the tokenizer's chat template;
``--prompts`` prompts x ``--group-size`` samples per step, at most ``--max-tokens`` completion tokens,
lr ``--lr`` constant, AdamW, grad clip 1.0, no KL term (TRL ``beta=0``, fleetrl ``kl_coef=0``), one
optimizer step per step, no held-out evaluation.

- **fleetrl**: ``python -m fleetrl train examples/<the task's config>`` as a subprocess with the
  workload's overrides (``--fleetrl-set`` adds more), one rollout worker (vLLM CPU) and one
  learner rank; steady s/step = median ``time/step`` over steps 2..N of its metrics.jsonl.
- **TRL**: ``trl.GRPOTrainer`` in a subprocess (this script with ``--trl-child``), torch threads =
  all cores. TRL cannot generate with vLLM on this CPU machine (its colocated vLLM reload fails,
  see ENVIRONMENT.md), so it runs with its default transformers ``generate``; steady s/step = median
  time between ``on_step_end`` callbacks over steps 2..N.

Start-up: the fleetrl run's ``time/startup`` (process start to its first step) and ``startup/*``
breakdown against one raw ``vllm.LLM`` (a worker's engine arguments) started in a fresh process up
to its first generate, in the same invocation: once with vLLM's own CPU process layout (its
defaults) and once with a worker's environment (``worker_env``).

"time to N steps" = the subprocess's wall time from launch to exit (imports, start-up, N steps,
final save), what a user waits. Run from the repository root:  python bench/bench_vs_trl.py --steps 50
(the real model: python bench/bench_vs_trl.py --task sums --steps 8 --prompts 4 --max-tokens 32)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=None, help="default: the task's (letters 5e-3, sums 1e-5)")
    p.add_argument("--task", choices=sorted(TASKS), default="letters",
                   help="letters: grpo_tiny.yaml on the tiny model; sums: grpo_smollm2.yaml on SmolLM2-135M")
    p.add_argument("--model", default=None,
                   help="a model directory for both sides (default: the task's model)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="build a tiny Qwen2 of this hidden size for both sides (with --num-layers)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--fleetrl-set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--fleetrl-variant", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="also run fleetrl with these overrides, back to back in the same invocation "
                        "(repeatable: one more row each), e.g. learner.num_threads=1")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # output json path
    p.add_argument("--raw-engine-child", default=None, help=argparse.SUPPRESS)  # output json path
    p.add_argument("--raw-vllm-defaults", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Each task: the fleetrl config, the training data, the reward (a builtin, the data column it reads),
# the sampling temperature and the learning rate; both sides run the same.
TASKS = {
    "letters": {"config": "grpo_tiny.yaml", "data": "letters_train.jsonl", "reward": "letter_fraction",
                "reward_kwargs": {}, "column": "letter", "temperature": 1.0, "lr": 5e-3, "model": "tiny"},
    "sums": {"config": "grpo_smollm2.yaml", "data": "sums_train.jsonl", "reward": "numeric_answer",
             "reward_kwargs": {"require_marker": False}, "column": "answer", "temperature": 0.7, "lr": 1e-5,
             "model": "smollm2-135m"},
}


def model_note(args) -> str:
    if args.hidden_size:
        return f"a tiny Qwen2 (hidden {args.hidden_size}, {args.num_layers} layers)"
    if args.model:
        return args.model
    return {"letters": "the built-in tiny model (hidden 128, 2 layers)",
            "sums": "the built-in SmolLM2-135M-Instruct (Q4_1-dequantized), the sums task"}[args.task]


def task_model(args) -> str:
    """The model directory both sides load: --model, else the task's built-in (built on first use)."""
    from fleetrl.run.runtime import resolve_model

    return args.model or resolve_model(TASKS[args.task]["model"])


def steady(times: list[float]) -> tuple[float, float, float]:
    rest = times[1:] or times
    return statistics.median(rest), min(rest), max(rest)


def run_fleetrl(args, out_dir: str, extra: list[str] = ()) -> dict:
    overrides = [f"run.steps={args.steps}", f"run.output_dir={out_dir}", "run.name=vs-trl",
                 "rollout.num_workers=1", f"rl.prompts_per_step={args.prompts}",
                 f"rl.group_size={args.group_size}", f"rollout.sampling.max_tokens={args.max_tokens}",
                 f"learner.lr={args.lr}", "learner.loss.kl_coef=0.0", "rl.eval_every=0", "data.eval_path=null",
                 f"rollout.sampling.temperature={TASKS[args.task]['temperature']}",
                 *([f"model.path={args.model}"] if args.model else []), *args.fleetrl_set, *extra]
    cmd = [sys.executable, "-m", "fleetrl", "train", str(ROOT / "examples" / TASKS[args.task]["config"]),
           *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"fleetrl train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = next(Path(out_dir).rglob("metrics.jsonl"))
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "time/step" in r]
    return {"wall": wall, "step_times": [r["time/step"] for r in rows],
            "startup": rows[0].get("time/startup", float("nan")),
            "phases": {k: statistics.median(r.get(k, 0.0) for r in rows[1:] or rows)
                       for k in ("time/generate", "time/reward_wait", "time/reference", "time/train",
                                 "time/weight_sync", "time/learner_wait", "time/fleet_idle")},
            "startup_parts": {k: v for k, v in rows[0].items() if k.startswith("startup/")},
            "reward_first": rows[0].get("reward/mean"), "reward_last": rows[-1].get("reward/mean"),
            "cmd": " ".join(cmd[1:])}


def run_trl(args, out_dir: str) -> dict:
    out_json = Path(out_dir) / "trl.json"
    cmd = [sys.executable, __file__, "--trl-child", str(out_json), "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--max-tokens", str(args.max_tokens), "--lr", str(args.lr), "--task", args.task,
           "--model", task_model(args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"TRL child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall": wall, **json.loads(out_json.read_text())}


def trl_child(args) -> None:
    """Inside the TRL subprocess: build the same workload and train N steps with GRPOTrainer."""
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fleetrl.data.rows import render_prompt
    from fleetrl.reward.builtins import make_builtin

    torch.set_num_threads(os.cpu_count() or 1)
    task = TASKS[args.task]
    model_path = args.model
    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [json.loads(ln) for ln in (ROOT / "examples" / "data" / task["data"]).read_text().splitlines()
            if ln.strip()]
    column = task["column"]
    data = Dataset.from_list([{"prompt": render_prompt(r["prompt"], tok), column: r[column]} for r in rows])
    score = make_builtin(task["reward"], task["reward_kwargs"])

    def task_reward(prompts, completions, **kw):  # noqa: ANN001  (TRL passes the row's columns as keywords)
        return score(prompts, completions, **{column: kw[column]})

    task_reward.__name__ = task["reward"]
    marks: list[float] = []
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            marks.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    batch = args.prompts * args.group_size
    cfg = GRPOConfig(
        output_dir=str(Path(args.trl_child).parent / "trl-out"), learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        num_generations=args.group_size, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_completion_length=args.max_tokens, temperature=task["temperature"], beta=0.0, num_iterations=1,
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model_path, reward_funcs=task_reward, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    t_train = time.perf_counter()
    trainer.train()
    trainer.save_model()  # the trained model on disk, as fleetrl's final_model/
    times = [b - a for a, b in zip([t_train] + marks[:-1], marks)]
    Path(args.trl_child).write_text(json.dumps({
        "step_times": times, "startup": t_train - t_start,
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "generation": "transformers generate (TRL default; vLLM unusable on this CPU)",
    }))


def raw_engine_child(args) -> None:
    """Start-up baseline: one ``vllm.LLM`` with a fleet worker's engine arguments, up to its first
    generate (the warm-up a worker does), in a fresh process. With ``--raw-vllm-defaults`` vLLM keeps
    its own process layout on CPU (the model in a third process); else a worker's environment
    (``worker_env``: the model inside the engine process, which ``LLM`` then runs in this one)."""
    t_start = time.perf_counter()
    from vllm import LLM, SamplingParams

    from fleetrl.rollout.config import RolloutConfig, worker_env
    from fleetrl.rollout.worker import engine_kwargs
    from fleetrl.run.config import load_config

    cfg: RolloutConfig = load_config(str(ROOT / "examples" / TASKS[args.task]["config"])).rollout
    env = worker_env(cfg, "cpu")
    if args.raw_vllm_defaults:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    os.environ.update(env)
    t_import = time.perf_counter()
    llm = LLM(**engine_kwargs(cfg, args.model))
    t_engine = time.perf_counter()
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}] * 2, SamplingParams(n=2, max_tokens=8))
    t_end = time.perf_counter()
    Path(args.raw_engine_child).write_text(json.dumps({
        "imports": t_import - t_start, "engine": t_engine - t_import, "first_generate": t_end - t_engine}))


def run_raw_engine(args, out_dir: str, vllm_defaults: bool) -> dict:
    out_json = Path(out_dir) / f"raw-{vllm_defaults}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--raw-engine-child", str(out_json),
                           *(["--raw-vllm-defaults"] if vllm_defaults else []),
                           "--task", args.task, "--model", task_model(args)],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"raw engine child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall": wall, **json.loads(out_json.read_text())}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.lr is None:
        args.lr = TASKS[args.task]["lr"]
    if args.trl_child:
        trl_child(args)
        return
    if args.raw_engine_child:
        raw_engine_child(args)
        return
    from _util import print_machine_state, print_table

    start = print_machine_state("start")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fleetrl-vs-trl-") as tmp:
        if args.hidden_size and not args.model:
            from fleetrl.testing.tiny import build_tiny_model

            args.model = str(build_tiny_model(Path(tmp) / "model", hidden_size=args.hidden_size,
                                              num_layers=args.num_layers))
        raws = {defaults: run_raw_engine(args, tmp, defaults) for defaults in (True, False)}
        for defaults, r in raws.items():
            print(f"raw vLLM engine ({'vLLM defaults' if defaults else 'worker env'}) ready in {r['wall']:.1f}s",
                  flush=True)
        results["fleetrl"] = run_fleetrl(args, str(Path(tmp) / "fleetrl"))
        print(f"fleetrl done in {results['fleetrl']['wall']:.1f}s", flush=True)
        for i, variant in enumerate(args.fleetrl_variant):
            name = f"fleetrl ({' '.join(variant)})"
            results[name] = run_fleetrl(args, str(Path(tmp) / f"fleetrl-variant-{i}"), variant)
            print(f"{name} done in {results[name]['wall']:.1f}s", flush=True)
        if not args.skip_trl:
            results["TRL GRPOTrainer"] = run_trl(args, tmp)
            print(f"TRL done in {results['TRL GRPOTrainer']['wall']:.1f}s", flush=True)
    end = print_machine_state("end")
    base = results["fleetrl"]
    table = []
    for name, r in results.items():
        med, lo, hi = steady(r["step_times"])
        b_med = steady(base["step_times"])[0]
        rf, rl = r.get("reward_first"), r.get("reward_last")
        table.append([name, f"{med:.2f} ({lo:.2f}-{hi:.2f})", f"{med / b_med:.2f}", f"{r['startup']:.1f}",
                      f"{r['wall']:.1f}", f"{r['wall'] / base['wall']:.2f}",
                      f"{rf:.3f} -> {rl:.3f}" if rf is not None and rl is not None else "-"])
    print_table(["trainer", "s/step median (min-max), steps 2..N", "vs fleetrl", "start-up s",
                 f"time to {args.steps} steps s", "vs fleetrl", "reward/mean step 1 -> N"], table,
                title=(f"GRPO on {model_note(args)}, {args.prompts} prompts x {args.group_size} samples x "
                       f"<= {args.max_tokens} tokens, "
                       f"lr {args.lr}, {args.steps} steps; load avg start {start['loadavg_1_5_15']}, "
                       f"end {end['loadavg_1_5_15']}"))
    for name, r in results.items():
        if "phases" in r:
            print(f"{name} step phases, median over steps 2..N (s): " + ", ".join(
                f"{k}={v:.3f}" for k, v in r["phases"].items()), flush=True)
    print("fleetrl start-up breakdown (s): " + ", ".join(
        f"{k}={v:.1f}" for k, v in sorted(base["startup_parts"].items())), flush=True)
    parts = base["startup_parts"]
    def raw_cells(fn):
        return [fn(raws[True]), fn(raws[False])]

    print_table(["start-up (s)", "fleetrl train -> first step", "raw vLLM engine, vLLM defaults",
                 "raw vLLM engine, a worker's env"], [
        ["total (process start to ready)", f"{base['startup']:.1f}", *raw_cells(lambda r: f"{r['wall']:.1f}")],
        ["imports, Ray, tokenizer, data / imports", f"{parts.get('startup/before_services', float('nan')):.1f}",
         *raw_cells(lambda r: f"{r['imports']:.1f}")],
        ["services (side by side)", f"{parts.get('startup/services', float('nan')):.1f}", "-", "-"],
        ["  learner ready", f"{parts.get('startup/learner_ready', float('nan')):.1f}", "-", "-"],
        ["  fleet ready (engine start / warm-up)",
         f"{parts.get('startup/fleet_ready', float('nan')):.1f} ({parts.get('startup/engine_start', float('nan')):.1f}"
         f" / {parts.get('startup/engine_warmup', float('nan')):.1f})",
         *raw_cells(lambda r: f"{r['engine'] + r['first_generate']:.1f} "
                              f"({r['engine']:.1f} / {r['first_generate']:.1f})")],
        ["after services (weight sync group, resume)", f"{parts.get('startup/after_services', float('nan')):.1f}",
         "-", "-"],
        ["fleetrl total / raw total", "-", *raw_cells(lambda r: f"{base['startup'] / r['wall']:.2f}")],
    ], title="Start-up, same invocation")
    print(f"fleetrl command: {base['cmd']}", flush=True)


if __name__ == "__main__":
    main()
