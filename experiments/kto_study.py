"""A small reproduction of the KTO paper's claims against DPO (and offline PPO) on CPU.

The question (KTO paper, Ethayarajh et al. 2024): does KTO match or beat DPO when the feedback is
imbalanced (far fewer desirable than undesirable examples, with the lambda rule) or noisy (flipped
labels, intransitive preferences)? This script builds its own synthetic preference task, trains the
project's random-init tiny model with DPO, KTO and offline PPO (binary rewards) under four data
conditions and several seeds, and reports held-out preference accuracy and the implicit-reward
margin (mean +- standard deviation over seeds). It regenerates the table of docs/kto_study.md
(between its "study:begin" / "study:end" markers), docs/kto_study.png and docs/kto_study.json.

The task ("letters", as in fleetrl/testing/tasks.py): a prompt asks for one letter written many times.
Each prompt has three kinds of completion, best first: A = a run of the asked letter, B = a run of
another letter, C = plain words without the asked letter.

Conditions (N training prompts; held-out pairs are always clean):
  a. balanced     N pairs A > (B or C); KTO / offline PPO get both answers of every pair.
  b. imbalance    desirable : undesirable = 1 : 10: every pair's rejected answer, but the chosen
                  answer of only N/10 pairs. KTO sets lambda_D by the paper's rule
                  (lambda_D * n_D / (lambda_U * n_U) in [1, 1.5]); DPO can only use the N/10 pairs
                  left whole (DPO on all N pairs is condition a).
  c. noise        condition a with 20% of the pairs flipped (chosen and rejected swapped).
  d. intransitive one comparison per prompt: A > B (40% of prompts), B > C (40%) and C > A (20%),
                  a cycle A > B > C > A across prompts whose majority order is still A > B > C;
                  held-out pairs test that order on all three comparisons.
Every algorithm gets the same optimizer (AdamW, lr 1e-3, a random-init tiny model needs a large
step), the same number of optimizer steps and the same number of sequences per step (DPO: 16 pairs,
KTO / offline PPO: 32 completions); beta = 0.1 for DPO and KTO, clip = 0.2 for offline PPO; no SFT
warm start. Runs in-process on one DeepSpeed rank (OfflineLearner, ZeRO-0): no Ray.

Run it (70 runs of about 5-10 s; 14 minutes on a shared 2-core machine; --seeds / --steps shorten it):
    python experiments/kto_study.py
The plot needs matplotlib:  pip install -e '.[study]'   (or pip install matplotlib)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fleetrl.testing.tasks import LETTERS, PROMPT_TEMPLATES, WORDS, write_jsonl

# The wall time reported covers the heavy imports (torch, DeepSpeed: inside the functions) and model builds.
T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]

DOCS = ROOT / "docs"
CONDITIONS = ("balanced", "imbalance", "noise", "intransitive")
CONDITION_TITLES = {
    "balanced": "a. balanced",
    "imbalance": "b. desirable:undesirable 1:10 (lambda rule)",
    "noise": "c. 20% flipped labels",
    "intransitive": "d. intransitive (cycle A>B>C>A)",
}
ALGORITHMS = ("dpo", "kto", "offline_ppo")
# What each run trains: (label, algorithm, its config section, data file). Two extra KTO runs: the
# paper's one-y-per-x setting (one answer per prompt, from the pairs) and the imbalance without the
# lambda rule (both weights 1), to see what the rule does.
BASE_RUNS = (("dpo", "dpo", {}, "pairs"), ("kto", "kto", {}, "unpaired"),
             ("offline_ppo", "offline_ppo", {}, "unpaired"))
EXTRA_RUNS = {
    "balanced": (("kto, one-y-per-x", "kto", {"one_y_per_x": True}, "pairs"),),
    "imbalance": (("kto, lambda_D = 1", "kto", {"desirable_weight": 1.0, "undesirable_weight": 1.0},
                   "unpaired"),),
}
BETA, CLIP, LR = 0.1, 0.2, 1e-3
PAIRS_PER_STEP = 16  # DPO pairs per step; KTO / offline PPO: twice as many completions
MAX_LENGTH = 64
FLIP_RATE, DESIRABLE_KEEP = 0.2, 0.1
INTRANSITIVE_SHARES = (("A", "B", 0.4), ("B", "C", 0.4), ("C", "A", 0.2))  # (chosen, rejected, share)
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


# ---------------------------------------------------------------------------------------------
# The synthetic task


def completion(rng: random.Random, kind: str, letter: str) -> str:
    """A = run of the asked letter, B = run of another letter, C = words without the letter."""
    if kind == "C":
        words = [w for w in WORDS if letter not in w]
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
    ch = letter if kind == "A" else rng.choice([x for x in LETTERS if x != letter])
    run = ch * rng.randint(4, 16)
    return " " + (" ".join(run) if rng.random() < 0.25 else run)


def prompts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(prompt, letter) pairs; letters cycle so every batch mixes them."""
    out = []
    for i in range(n):
        letter = LETTERS[i % len(LETTERS)]
        out.append((rng.choice(PROMPT_TEMPLATES).format(letter=letter), letter))
    return out


def pair(rng: random.Random, prompt: str, letter: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": completion(rng, chosen, letter),
            "rejected": completion(rng, rejected, letter), "kinds": chosen + rejected}


def split(pairs: list[dict]) -> list[dict]:
    """Both answers of every pair as unpaired rows (chosen: desirable, rejected: undesirable)."""
    rows = []
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return rows


def build_condition(condition: str, n_train: int, n_eval: int, seed: int) -> dict[str, list[dict]]:
    """{"pairs": DPO's training pairs, "unpaired": KTO / offline PPO's rows, "eval": held-out pairs}."""
    rng = random.Random(f"kto-study:{condition}:{seed}")
    train_prompts, eval_prompts = prompts(rng, n_train), prompts(rng, n_eval)
    if condition == "intransitive":
        kinds = [(c, r) for c, r, share in INTRANSITIVE_SHARES for _ in range(round(share * n_train))]
        kinds = (kinds + kinds)[:n_train]
        rng.shuffle(kinds)
        pairs = [pair(rng, p, x, c, r) for (p, x), (c, r) in zip(train_prompts, kinds)]
        truth = [("A", "B"), ("B", "C"), ("A", "C")]  # the majority order, on every comparison
        held_out = [pair(rng, p, x, *truth[i % 3]) for i, (p, x) in enumerate(eval_prompts)]
        return {"pairs": pairs, "unpaired": split(pairs), "eval": held_out}
    pairs = [pair(rng, p, x, "A", rng.choice("BC")) for p, x in train_prompts]
    held_out = [pair(rng, p, x, "A", rng.choice("BC")) for p, x in eval_prompts]
    if condition == "noise":
        for i in rng.sample(range(n_train), round(FLIP_RATE * n_train)):
            p = pairs[i]
            pairs[i] = {**p, "chosen": p["rejected"], "rejected": p["chosen"], "kinds": p["kinds"][::-1]}
    unpaired = split(pairs)
    if condition == "imbalance":
        keep = set(rng.sample(range(n_train), round(DESIRABLE_KEEP * n_train)))
        unpaired = [row for i, row in enumerate(unpaired) if not row["label"] or i // 2 in keep]
        pairs = [p for i, p in enumerate(pairs) if i in keep]  # DPO: only the pairs left whole
    return {"pairs": pairs, "unpaired": unpaired, "eval": held_out}


# ---------------------------------------------------------------------------------------------
# One training run, in-process


def runs_of(condition: str) -> tuple:
    return BASE_RUNS + EXTRA_RUNS.get(condition, ())


def run_config(algo: str, section: dict, model_path: str, train: Path, held_out: Path, out: Path, name: str,
               seed: int, steps: int, eval_every: int) -> dict[str, Any]:
    per_step = PAIRS_PER_STEP if algo == "dpo" else 2 * PAIRS_PER_STEP
    sections = {"dpo": {"beta": BETA}, "kto": {"beta": BETA}, "offline_ppo": {"clip": CLIP}}
    sections[algo] = {**sections[algo], **section}
    return {
        "algorithm": algo,
        "run": {"output_dir": str(out), "name": name, "seed": seed, "steps": steps, "tensorboard": False},
        "model": {"path": model_path},
        "data": {"path": str(train)},
        "eval_data": {"path": str(held_out)},
        "offline": {"batch_size": per_step, "max_length": MAX_LENGTH, "eval_every": eval_every,
                    "eval_batch_size": 128, "reference_logps": "precompute"},
        # Written down, so the papers' defaults (DPO: RMSprop 5e-7, ...) do not apply: one optimizer for all.
        "learner": {"num_ranks": 1, "zero_stage": 0, "lr": LR, "optimizer": "adamw",
                    "micro_batch_size": per_step, "seed": seed},
        **sections,
    }


def train_one(tree: dict, tokenizer: Any, eval_kinds: list[str]) -> dict[str, Any]:
    """Train one config; returns the held-out curve [(step, accuracy, margin in nats)], the final
    accuracy per kind of held-out comparison ("AB", "AC", ...) and the data counts. Uses OfflineRun's
    own pieces (data, schedule, reference, evaluation); no checkpoints."""
    from fleetrl.learner.deepspeed_utils import free_port
    from fleetrl.learner.offline import OfflineLearner
    from fleetrl.offline.loop import OfflineRun
    from fleetrl.run.config import config_from_dict
    from fleetrl.run.runtime import RunDir

    cfg = config_from_dict(tree)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run = OfflineRun(cfg, RunDir(cfg), tokenizer)
        learner = OfflineLearner(cfg.learner, cfg.model.path, master_port=free_port(),
                                 total_steps=run.schedule.total_steps, mini_batch_size=cfg.offline.batch_size,
                                 **run.learner_kwargs())
        try:
            run.prepare_reference(learner)
            curve = [_point(0, run.evaluate(learner), run.implicit_beta)]
            for step in range(run.schedule.total_steps):
                stats = learner.train_step(run.batch(step))
                if not math.isfinite(stats["loss"]):
                    raise RuntimeError(f"{cfg.algorithm}: non-finite loss at step {step + 1}")
                if (step + 1) % cfg.offline.eval_every == 0 or step + 1 == run.schedule.total_steps:
                    curve.append(_point(step + 1, run.evaluate(learner), run.implicit_beta))
            by_kind = _accuracy_by_kind(run, learner, eval_kinds)
        finally:
            del learner
            gc.collect()
    (run.run_dir.path / "train.log").write_text(log.getvalue())
    st = run.train_stats
    return {"curve": curve, "by_kind": by_kind, "examples": st.examples, "desirable": st.desirable,
            "undesirable": st.undesirable, "weights": list(run.weights) if run.weights else None}


def _accuracy_by_kind(run: Any, learner: Any, kinds: list[str]) -> dict[str, float]:
    """Held-out accuracy of each kind of comparison, from the same implicit rewards as evaluate()."""
    k = len(run.eval)
    if k != len(kinds):
        raise RuntimeError(f"{len(kinds) - k} held-out pairs were skipped while encoding; raise MAX_LENGTH")
    lp, _ = run._logps(learner, run._seqs(run.eval), "policy")
    ratio = lp - run._eval_ref
    right = (ratio[:k] > ratio[k:]).tolist()
    return {kind: statistics.fmean(r for r, x in zip(right, kinds) if x == kind)
            for kind in sorted(set(kinds))}


def _point(step: int, ev: dict[str, float], beta: float) -> list[float]:
    return [step, ev["eval/accuracy"], ev["eval/rewards/margins"] / beta]


# ---------------------------------------------------------------------------------------------
# The study


def study(seeds: list[int], steps: int, n_train: int, n_eval: int, eval_every: int, work: Path) -> dict:
    from fleetrl.run.runtime import load_tokenizer
    from fleetrl.testing.tiny import ensure_tiny_model

    results: list[dict] = []
    t0 = time.perf_counter()
    for seed in seeds:
        model_path = str(ensure_tiny_model("policy", seed=seed))  # a different random init per seed
        tokenizer = load_tokenizer(model_path)
        for condition in CONDITIONS:
            data = build_condition(condition, n_train, n_eval, seed)
            where = work / condition / f"seed{seed}"
            pairs_file = write_jsonl(data["pairs"], where / "pairs.jsonl")
            unpaired_file = write_jsonl(data["unpaired"], where / "unpaired.jsonl")
            eval_file = write_jsonl(data["eval"], where / "eval.jsonl")
            files = {"pairs": pairs_file, "unpaired": unpaired_file}
            for i, (label, algo, section, data_key) in enumerate(runs_of(condition)):
                t = time.perf_counter()
                tree = run_config(algo, section, model_path, files[data_key], eval_file, where / "runs",
                                  f"{i}-{algo}", seed, steps, eval_every)
                out = train_one(tree, tokenizer, [p["kinds"] for p in data["eval"]])
                out.update({"condition": condition, "label": label, "algorithm": algo, "seed": seed,
                            "seconds": round(time.perf_counter() - t, 1)})
                results.append(out)
                acc, margin = out["curve"][-1][1:]
                print(f"[{time.perf_counter() - t0:7.1f}s] seed {seed} {condition:12s} {label:17s} "
                      f"examples {out['examples']:4d}  held-out accuracy {acc:.3f}  "
                      f"margin {margin:+.2f} nats ({out['seconds']:.0f}s)", flush=True)
    return {
        "settings": {"seeds": seeds, "steps": steps, "n_train": n_train, "n_eval": n_eval,
                     "eval_every": eval_every, "lr": LR, "beta": BETA, "clip": CLIP,
                     "pairs_per_step": PAIRS_PER_STEP, "flip_rate": FLIP_RATE,
                     "desirable_keep": DESIRABLE_KEEP},
        "wall_seconds": round(time.perf_counter() - T_START, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
                   f"{__import__('torch').get_num_threads()}",
        "results": results,
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def runs(results: list[dict], condition: str, label: str) -> list[dict]:
    return [r for r in results if r["condition"] == condition and r["label"] == label]


def final(results: list[dict], condition: str, label: str, index: int) -> list[float]:
    """The final held-out value (1: accuracy, 2: margin) of every seed's run."""
    return [r["curve"][-1][index] for r in runs(results, condition, label)]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdicts(results: list[dict]) -> list[str]:
    """KTO vs DPO per condition, by mean accuracy, and whether the gap exceeds the seeds' spread."""
    lines = []
    for condition in CONDITIONS:
        k, d = final(results, condition, "kto", 1), final(results, condition, "dpo", 1)
        mk, md = mean_sd(k)[0], mean_sd(d)[0]
        diffs = [a - b for a, b in zip(k, d)]  # same seed, same data, same initial model
        md_, sd_ = mean_sd(diffs)
        wins = sum(x > 0 for x in diffs)
        ties = sum(x == 0 for x in diffs)
        holds = "holds" if mk >= md else "does not hold"
        lines.append(f"- **{CONDITION_TITLES[condition]}**: KTO {mk:.3f} vs DPO {md:.3f}: "
                     f"KTO >= DPO {holds}; paired difference {md_:+.3f} +- {sd_:.3f} "
                     f"(KTO ahead on {wins} of {len(diffs)} seeds"
                     f"{f', {ties} ties' if ties else ''}).")
    k_b, d_a = final(results, "imbalance", "kto", 1), final(results, "balanced", "dpo", 1)
    lines.append(f"- **The paper's imbalance claim** (KTO with 90% of the desirable examples discarded "
                 f"vs DPO on all pairs, condition a): KTO {mean_sd(k_b)[0]:.3f} "
                 f"vs DPO {mean_sd(d_a)[0]:.3f}.")
    one = final(results, "balanced", "kto, one-y-per-x", 1)
    lines.append(f"- **One-y-per-x** (KTO on one answer per prompt, half the completions): "
                 f"{mean_sd(one)[0]:.3f} vs KTO on both answers "
                 f"{mean_sd(final(results, 'balanced', 'kto', 1))[0]:.3f} and DPO "
                 f"{mean_sd(d_a)[0]:.3f}.")
    rule, plain = final(results, "imbalance", "kto", 1), final(results, "imbalance", "kto, lambda_D = 1", 1)
    lines.append(f"- **The lambda rule** at 1:10: KTO {mean_sd(rule)[0]:.3f} with it, "
                 f"{mean_sd(plain)[0]:.3f} with lambda_D = lambda_U = 1.")
    parts = []
    for label in (b[0] for b in BASE_RUNS):
        by = [r["by_kind"] for r in runs(results, "intransitive", label)]
        parts.append(f"{label} " + ", ".join(f"{k[0]}>{k[1]} {statistics.fmean(b[k] for b in by):.2f}"
                                              for k in sorted(by[0])))
    lines.append("- **Intransitive, per held-out comparison** (A>C is the one the 20% of C>A training pairs "
                 "contradict): " + "; ".join(parts) + ".")
    return lines


def table(report: dict) -> str:
    results, s = report["results"], report["settings"]
    run_s = statistics.median(r["seconds"] for r in results)
    intro = (f"Held-out preference accuracy (implicit reward of the chosen answer > the rejected one) and "
             f"margin (log-ratio chosen - log-ratio rejected, in nats, the same scale for every algorithm) "
             f"after "
             f"{s['steps']} optimizer steps; mean +- standard deviation over {len(s['seeds'])} seeds "
             f"({', '.join(map(str, s['seeds']))}). Examples: training examples of the run (DPO: pairs).")
    lines = [
        intro,
        "",
        "| condition | algorithm | examples | accuracy | margin (nats) |",
        "|---|---|---:|---:|---:|",
    ]
    for condition in CONDITIONS:
        for label, *_ in runs_of(condition):
            acc, margin = final(results, condition, label, 1), final(results, condition, label, 2)
            ex = [r["examples"] for r in runs(results, condition, label)]
            (ma, sa), (mm, sm) = mean_sd(acc), mean_sd(margin)
            lines.append(f"| {CONDITION_TITLES[condition]} | {label} | {round(statistics.fmean(ex))} | "
                         f"{ma:.3f} +- {sa:.3f} | {mm:+.2f} +- {sm:.2f} |")
    weights = [r["weights"] for r in runs(results, "imbalance", "kto")]
    lambdas = ", ".join(f"{w[0]:.2f}" for w in weights)
    wall = (f"Wall time: {report['wall_seconds'] / 60:.1f} min for {len(results)} runs on "
            f"{report['machine']} (`{report['command']}`); the median run took {run_s:.0f} s.")
    lines += ["", "Computed from these numbers:", "", *verdicts(results), "",
              f"KTO's weights in condition b (lambda rule): lambda_D = {lambdas}, lambda_U = 1.", "",
              wall, "", "![held-out accuracy per condition](kto_study.png)"]
    return "\n".join(lines)


def write_doc(report: dict, path: Path) -> None:
    block = f"{BEGIN}\n{table(report)}\n{END}"
    text = path.read_text() if path.exists() else f"# KTO vs DPO: a CPU-sized study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers: add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + block + rest.split(END, 1)[1])


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot. Install it with  pip install -e '.[study]'  "
              "(or pip install matplotlib) and run again.", file=sys.stderr)
        return False
    results = report["results"]
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(4.2 * len(CONDITIONS), 3.6), sharey=True)
    colors = {"dpo": "tab:blue", "kto": "tab:orange", "offline_ppo": "tab:green"}
    for ax, condition in zip(axes, CONDITIONS):
        for label, algo, *_ in runs_of(condition):
            curves = [r["curve"] for r in runs(results, condition, label)]
            steps = [p[0] for p in curves[0]][1:]  # step 0: policy = reference, every pair ties
            acc = [[c[i + 1][1] for c in curves] for i in range(len(steps))]
            m = [statistics.fmean(a) for a in acc]
            sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
            extra = label != algo
            ax.plot(steps, m, label=label, color="tab:red" if extra else colors[algo],
                    ls="--" if extra else "-")
            if not extra:
                ax.fill_between(steps, [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                                color=colors[algo], alpha=0.2)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(CONDITION_TITLES[condition], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0.3, 1.0)
    axes[0].set_ylabel("held-out preference accuracy")
    for ax in axes[:2]:
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("Held-out preference accuracy of the tiny model, mean +- sd over "
                 f"{len(report['settings']['seeds'])} seeds (dotted: chance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=64, help="optimizer steps per run")
    p.add_argument("--train", type=int, default=256, help="training prompts per condition")
    p.add_argument("--eval", type=int, default=129, help="held-out pairs per condition")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--out", type=Path, default=DOCS, help="where kto_study.{md,png,json} go")
    # The tiny model's ops are too small to gain from a second thread, and on a shared machine two
    # OpenMP threads wait on each other at every op (runs went from ~6 s to ~300 s under load).
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table and plot from OUT/kto_study.json without training")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if round(DESIRABLE_KEEP * args.train) < PAIRS_PER_STEP:
        raise SystemExit(f"--train {args.train} leaves DPO fewer than {PAIRS_PER_STEP} whole pairs "
                         f"(one batch) in the 1:10 condition: use --train "
                         f"{math.ceil(PAIRS_PER_STEP / DESIRABLE_KEEP)} or more")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "kto_study.json"
    if args.report_only:
        report = json.loads(json_path.read_text())
    else:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="kto-study-") as work:
            report = study(args.seeds, args.steps, args.train, args.eval, args.eval_every, Path(work))
        args_given = argv if argv is not None else sys.argv[1:]
        report["command"] = "python experiments/kto_study.py " + " ".join(args_given)
        report["command"] = report["command"].strip()
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    write_doc(report, args.out / "kto_study.md")
    drew = plot(report, args.out / "kto_study.png")
    print(table(report))
    png = f", {args.out / 'kto_study.png'}" if drew else ""
    print(f"wrote {json_path}, {args.out / 'kto_study.md'}{png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
