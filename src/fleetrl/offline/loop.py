"""Offline trainers (SFT, RM, DPO/cDPO, IPO, KTO, ORPO, SimPO, offline PPO): fixed data -> DeepSpeed learner.

The driver encodes the data once, fixes the order of every optimizer step (`Schedule`), obtains
the reference log-probs (precomputed once up front, or on the fly inside the learner), then
runs one optimizer step per batch with held-out evaluation every `offline.eval_every` steps.
What differs between algorithms is asked of the algorithm's learner objective (its class's
`reference_inputs` and `evaluation`, fleetrl.learner.offline) and of its config section, never of
its name.
The learner is an `OfflineLearnerGroup` (Ray actors, one per DeepSpeed rank); `OfflineRun` only
needs its methods, so tests can also drive a single in-process `OfflineLearner`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fleetrl.algos.preference import kto_default_weights
from fleetrl.data.offline import (
    Encoder,
    EncodeStats,
    Labeled,
    Pair,
    Schedule,
    Seq,
    collate,
    collate_rows,
    kto_counts,
    pack,
)
from fleetrl.data.rows import (
    DataConfig,
    DataError,
    PreferenceRow,
    infer_kind,
    load_rows,
    load_train_eval,
    read_records,
)
from fleetrl.learner.offline import preference_losses, reward_model_losses
from fleetrl.learner.offline_config import OFFLINE_TABLE
from fleetrl.learner.rank import objective_class
from fleetrl.metrics.local import Progress, Ticker, _fmt_s
from fleetrl.run.config import RunConfig
from fleetrl.run.runtime import RunDir, connect_ray, load_tokenizer, resolve_model

log = logging.getLogger("fleetrl")


def algorithm_section(cfg: RunConfig) -> Any:
    """The run config's section of its (offline) algorithm, e.g. cfg.dpo."""
    return getattr(cfg, cfg.algorithm)


class OfflineProgress(Progress):
    """One console line per logged step: loss, accuracy, held-out figures, step time, ETA."""

    FIELDS = (("train/loss", "loss"), ("train/rewards/accuracies", "acc"), ("train/scores/accuracies", "acc"),
              ("train/kl", "kl"), ("train/clip_frac", "clip"), ("eval/accuracy", "eval_acc"),
              ("eval/nll", "eval_nll"),
              ("time/step", "step_s"))

    def update(self, step: int, row: dict) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"]
        for key, label in self.FIELDS:
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                parts.append(f"{label} {row[key]:.4g}")
        parts.append(f"eta {_fmt_s(eta)}")
        print("fleetrl: " + " | ".join(parts), file=self.stream, flush=True)


class OfflineRun:
    """Data, schedule and loop of one offline run; `run(learner)` trains and writes the run dir."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, tokenizer: Any):
        self.cfg, self.run_dir, self.tokenizer = cfg, run_dir, tokenizer
        self.algorithm = cfg.algorithm
        self.section = algorithm_section(cfg)
        self.pad_id = int(tokenizer.pad_token_id)
        self.objective = objective_class(self.algorithm)
        oc = cfg.offline
        margin_key = getattr(self.section, "margin_key", None)
        act = cfg.data.apply_chat_template
        self.unpaired = OFFLINE_TABLE[self.algorithm].unpaired
        feedback = self.section if self.unpaired else None
        encoder = Encoder(self.algorithm, tokenizer, oc.max_length, act, margin_key, feedback, cfg.run.seed)
        scored = self.unpaired and self.section.score_key is not None
        train_rows, eval_rows = load_train_eval(cfg.data, _scored_kind(cfg.data) if scored else None)
        if cfg.eval_data is not None:
            eval_rows = load_rows(cfg.eval_data, _scored_kind(cfg.eval_data) if scored else None)
        self.train, self.train_stats = encoder.encode(train_rows)
        # KTO / offline PPO are evaluated on pairs when the held-out rows are pairs (implicit-reward
        # accuracy).
        eval_algo = "dpo" if self.unpaired and eval_rows and isinstance(eval_rows[0], PreferenceRow) \
            else self.algorithm
        eval_encoder = Encoder(eval_algo, tokenizer, oc.max_length, act, margin_key, feedback, cfg.run.seed)
        self.eval, self.eval_stats = eval_encoder.encode(eval_rows) if eval_rows else ([], EncodeStats())
        if not self.train:
            raise DataError(f"{cfg.data.path}: no training example is left after encoding "
                            f"({self._describe(self.train_stats)}); raise offline.max_length or check the "
                            "data")
        self.completion_only = getattr(self.section, "completion_only_loss", True)
        self.units: Sequence[Any] = self.train
        if getattr(self.section, "packing", False):
            self.units = pack(self.train, oc.max_length)
        # Class weights (KTO's lambda_D, lambda_U): from the config, or from the data's class counts.
        self.weights = self._kto_weights() if "desirable_weight" in type(self.section).model_fields else None
        if self.unpaired:
            self._print_feedback()
        self.schedule = Schedule(len(self.units), oc.batch_size, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                                 epochs=oc.epochs, steps=cfg.run.steps)
        # Which reference values batches carry (None: the objective needs no reference).
        self.reference_inputs = self.objective.reference_inputs(self.algorithm)
        self.precompute = self.reference_inputs is not None and oc.reference_logps == "precompute"
        self._ref: dict[str, torch.Tensor] = {}  # per training example
        self._ref_kl: dict[int, torch.Tensor] = {}  # KTO: per optimizer step
        self._ref_tokens: list[torch.Tensor] = []  # offline PPO: completion-token log-probs per example
        self._eval_ref: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _describe(s: EncodeStats) -> str:
        return (f"{s.rows} rows -> {s.examples} examples; {s.truncated} truncated, "
                f"{s.skipped_too_long} skipped as too long, {s.skipped_empty} with an empty completion")

    def _print_feedback(self) -> None:
        """What the unpaired data became: classes, one-y-per-x picks, score threshold and weights."""
        st, sec = self.train_stats, self.section
        parts = [f"{st.desirable} desirable, {st.undesirable} undesirable training examples"]
        if st.one_y_per_x_dropped:
            parts.append(f"one_y_per_x kept one completion of each of {st.one_y_per_x_dropped} preference "
                         "rows "
                         f"(seed {self.cfg.run.seed})")
        if sec.score_key is not None:
            w = [e.weight for e in self.train]
            parts.append(f"'{sec.score_key}' >= {sec.score_threshold:g} is desirable; "
                         f"weights '{sec.score_weighting}'"
                         f" (min {min(w):.3g}, max {max(w):.3g})")
        print(f"fleetrl: {self.algorithm}: " + "; ".join(parts), flush=True)

    def _kto_weights(self) -> tuple[float, float]:
        n_d, n_u = kto_counts(self.train)  # type: ignore[arg-type]
        sec = self.section
        if sec.desirable_weight is not None:
            wd, wu, how = sec.desirable_weight, sec.undesirable_weight, "from the config"
        else:
            wd, wu = kto_default_weights(n_d, n_u)
            how = "set from the data so that lambda_D*n_D / (lambda_U*n_U) is in [1, 1.5]"
        if n_d == 0 or n_u == 0:
            log.warning("kto: the training data has %d desirable and %d undesirable examples; "
                        "KTO is meant for both kinds", n_d, n_u)
        print(f"fleetrl: kto weights lambda_D={wd:.4g} lambda_U={wu:.4g} ({how}; {n_d} desirable, "
              f"{n_u} undesirable examples)", flush=True)
        return wd, wu

    @property
    def implicit_beta(self) -> float:
        """Scale of the implicit reward beta * log(policy / reference) in metrics: the algorithm's
        beta, 1 for offline PPO (which has none: its rewards are plain log ratios)."""
        return getattr(self.section, "beta", 1.0)

    def learner_algo_config(self) -> dict:
        out = self.section.model_dump()
        if self.weights is not None:
            out["desirable_weight"], out["undesirable_weight"] = self.weights
        return out

    def learner_kwargs(self) -> dict:
        """What OfflineLearnerGroup / OfflineLearner need besides the learner config and model."""
        return {"algorithm": self.algorithm, "algo_cfg": self.learner_algo_config(),
                "pad_token_id": self.pad_id, "max_length": self.cfg.offline.max_length}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.schedule.batch(step)
        out = collate([self.units[i] for i in idx], self.pad_id, self.completion_only)
        if self.precompute:
            out.update(getattr(self, f"_attach_{self.reference_inputs}")(idx, step, out))
        return out

    # what each kind of reference input adds to a training batch
    def _attach_pair(self, idx: list[int], step: int, out: dict) -> dict[str, torch.Tensor]:
        return {"ref_chosen_logps": self._ref["chosen"][idx],
                "ref_rejected_logps": self._ref["rejected"][idx]}

    def _attach_kto(self, idx: list[int], step: int, out: dict) -> dict[str, torch.Tensor]:
        return {"ref_logps": self._ref["logps"][idx], "ref_kl_logps": self._ref_kl[step]}

    def _attach_tokens(self, idx: list[int], step: int, out: dict) -> dict[str, torch.Tensor]:
        return {"old_logprobs": place_token_values([self._ref_tokens[i] for i in idx], out["loss_mask"])}

    # ------------------------------------------------------------------ scoring helpers

    def _chunks(self, seqs: Sequence[Seq], ticker: Ticker | None = None):
        bs = self.cfg.offline.eval_batch_size
        for i in range(0, len(seqs), bs):
            yield collate_rows(seqs[i : i + bs], self.pad_id, self.completion_only)
            if ticker is not None:
                ticker.advance(len(seqs[i : i + bs]))

    def _logps(self, learner, seqs: Sequence[Seq], which: str,
               ticker: Ticker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lp, n = [], []
        for rows in self._chunks(seqs, ticker):
            out = learner.sequence_logps(rows, which)
            lp.append(out["logps"])
            n.append(out["tokens"])
        return torch.cat(lp), torch.cat(n)

    def _token_logps(self, learner, seqs: Sequence[Seq], which: str,
                     ticker: Ticker | None = None) -> list[torch.Tensor]:
        """Per sequence, the log-probs of its completion tokens (1-D, in order)."""
        out = []
        for rows in self._chunks(seqs, ticker):
            lp = learner.compute_logprobs(rows, which)
            mask = (rows["loss_mask"] * rows["attention_mask"]).bool()
            out.extend(lp[i][mask[i]].float() for i in range(lp.shape[0]))
        return out

    def _scores(self, learner, seqs: Sequence[Seq], ticker: Ticker | None = None) -> torch.Tensor:
        return torch.cat([learner.sequence_scores(rows) for rows in self._chunks(seqs, ticker)])

    @staticmethod
    def _seqs(examples: Sequence[Any]) -> list[Seq]:
        """Every sequence of the examples: chosen ones then rejected ones for pairs."""
        if examples and isinstance(examples[0], Pair):
            return [p.chosen for p in examples] + [p.rejected for p in examples]
        if examples and isinstance(examples[0], Labeled):
            return [e.seq for e in examples]
        return list(examples)

    def prepare_reference(self, learner, start_step: int = 0) -> float:
        """Reference log-probs of the eval data (always, once) and, with precompute, of every
        training example and KTO KL row; then the reference is released. Returns the seconds spent."""
        if self.reference_inputs is None:
            return 0.0
        t = time.perf_counter()
        if self.eval:
            seqs = self._seqs(self.eval)
            self._eval_ref = self._logps(learner, seqs, "reference",
                                         Ticker("reference log-probs of the held-out data", len(seqs)))[0]
        if self.precompute:
            getattr(self, f"_precompute_{self.reference_inputs}")(learner, start_step)
            learner.release_reference()
        seconds = time.perf_counter() - t
        what = "precomputed and released" if self.precompute else "kept for on-the-fly scoring"
        print(f"fleetrl: reference log-probs {what} in {seconds:.1f}s", flush=True)
        return seconds

    @staticmethod
    def _train_ticker(seqs: Sequence[Seq]) -> Ticker:
        return Ticker("precomputing reference log-probs of the training data", len(seqs))

    def _precompute_pair(self, learner, start_step: int) -> None:
        seqs = self._seqs(self.train)
        lp, _ = self._logps(learner, seqs, "reference", self._train_ticker(seqs))
        n = len(self.train)
        self._ref = {"chosen": lp[:n], "rejected": lp[n:]}

    def _precompute_kto(self, learner, start_step: int) -> None:
        seqs = self._seqs(self.train)
        self._ref = {"logps": self._logps(learner, seqs, "reference", self._train_ticker(seqs))[0]}
        steps = range(start_step, self.schedule.total_steps)
        ticker = Ticker("precomputing KTO's reference KL terms", len(steps), unit="steps")
        for step in steps:
            rows = collate([self.units[i] for i in self.schedule.batch(step)], self.pad_id)
            self._ref_kl[step] = learner.kl_reference_logps(rows)
            ticker.advance(1)

    def _precompute_tokens(self, learner, start_step: int) -> None:
        seqs = self._seqs(self.train)
        self._ref_tokens = self._token_logps(learner, seqs, "reference", self._train_ticker(seqs))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, learner, step: int = 0) -> dict[str, float]:
        """Held-out metrics (eval/...) computed with the training losses' own formulas."""
        if not self.eval:
            return {}
        t = time.perf_counter()
        kind = self.objective.evaluation
        if kind == "pairs" and not isinstance(self.eval[0], Pair):
            kind = "unpaired"  # KTO / offline PPO on unpaired held-out data
        ticker = Ticker(f"eval at step {step}", len(self._seqs(self.eval)), last_line=False)  # summary below
        out = getattr(self, f"_eval_{kind}")(learner, ticker)
        out["time/eval"] = time.perf_counter() - t
        figures = ", ".join(f"{k.removeprefix('eval/')} {out[k]:.4g}" for k in ("eval/loss", "eval/accuracy",
                                                                                "eval/nll") if k in out)
        print(f"fleetrl: eval at step {step}: {figures} on {len(self.eval)} held-out examples "
              f"({out['time/eval']:.1f}s)", flush=True)
        return out

    def _eval_nll(self, learner, ticker: Ticker | None = None) -> dict[str, float]:
        lp, n = self._logps(learner, self.eval, "policy", ticker)
        nll = float(-lp.sum() / n.sum().clamp(min=1))
        return {"eval/nll": nll, "eval/loss": nll}

    def _eval_scores(self, learner, ticker: Ticker | None = None) -> dict[str, float]:
        scores = self._scores(learner, self._seqs(self.eval), ticker)
        k = len(self.eval)
        margin = None
        if self.eval[0].margin is not None:
            margin = torch.tensor([p.margin or 0.0 for p in self.eval])
        losses, stats = reward_model_losses(scores[:k], scores[k:], margin)
        return {"eval/loss": losses.mean().item(), **_means("eval/", stats),
                "eval/accuracy": stats["scores/accuracies"].mean().item()}

    def _eval_pairs(self, learner, ticker: Ticker | None = None) -> dict[str, float]:
        lp, n = self._logps(learner, self._seqs(self.eval), "policy", ticker)
        k = len(self.eval)
        ref = self._eval_ref
        ref_c, ref_r = (ref[:k], ref[k:]) if ref is not None else (None, None)
        out: dict[str, float] = {}
        if self.unpaired:  # implicit rewards beta * (policy - reference) of both answers
            _, stats = preference_losses("dpo", {"beta": self.implicit_beta}, lp[:k], lp[k:], n[:k], n[k:],
                                         ref_c, ref_r)
        else:
            losses, stats = preference_losses(self.algorithm, self.section, lp[:k], lp[k:], n[:k], n[k:],
                                              ref_c, ref_r)
            out["eval/loss"] = losses.mean().item()
        out.update(_means("eval/", stats))
        out["eval/accuracy"] = stats["rewards/accuracies"].mean().item()
        return out

    def _eval_unpaired(self, learner, ticker: Ticker | None = None) -> dict[str, float]:
        lp, _ = self._logps(learner, self._seqs(self.eval), "policy", ticker)
        rewards = self.implicit_beta * (lp - self._eval_ref)
        good = torch.tensor([e.desirable for e in self.eval])
        return _kto_unpaired_eval(rewards, good)

    # ------------------------------------------------------------------ the loop

    def run(self, learner, ray_metrics: Any = None) -> Path:
        """Train; ``ray_metrics`` (a RayMetricsExporter) also gets every metrics row."""
        cfg, run_dir = self.cfg, self.run_dir
        sched = self.schedule
        start_step = 0
        if cfg.run.resume and (ckpt := run_dir.latest_checkpoint()) is not None:
            start_step = int(learner.load_checkpoint(ckpt, cfg.run.storage_options)["step"])
            run_dir.truncate_logs(start_step)  # rows of steps after the checkpoint are redone
            print(f"fleetrl: resumed from {ckpt} at step {start_step}", flush=True)
        if cfg.paper_defaults_applied:
            print(f"fleetrl: {self.algorithm} paper defaults (unset in the config): "
                  + ", ".join(f"{k}={v}" for k, v in cfg.paper_defaults_applied.items()), flush=True)
        print(f"fleetrl: {self.algorithm}: {self._describe(self.train_stats)}; {len(self.units)} "
              f"{'packed rows' if self.units is not self.train else 'training examples'}, "
              f"{len(self.eval)} held-out; {sched.total_steps} optimizer steps of {sched.batch_size} "
              f"({sched.steps_per_epoch} per epoch, {sched.dropped_per_epoch} left out of each epoch's "
              "shuffle)",
              flush=True)
        ref_s = self.prepare_reference(learner, start_step)

        metrics = run_dir.metrics_writer(cfg, append=start_step > 0)
        progress = OfflineProgress(total=sched.total_steps, start=start_step)
        constant = {}
        if self.weights is not None:
            constant = {"kto/desirable_weight": self.weights[0], "kto/undesirable_weight": self.weights[1]}
        if start_step == 0:
            row = {"step": 0, **self.evaluate(learner, 0), **constant, "time/reference": ref_s,
                   **self.train_stats.as_metrics("data/train"), **self.eval_stats.as_metrics("data/eval"),
                   "data/left_out_per_epoch": sched.dropped_per_epoch}
            metrics.write(row)
            if ray_metrics is not None:
                ray_metrics.export(row)
            if self.eval:
                progress.update(0, row)

        every = cfg.offline.eval_every
        for step in range(start_step, sched.total_steps):
            t0 = time.perf_counter()
            batch = self.batch(step)
            t = time.perf_counter()
            stats = learner.train_step(batch)
            train_s = time.perf_counter() - t
            done = step + 1
            last = done == sched.total_steps
            row = {"step": done, "epoch": sched.epoch_of(step),
                   **{f"train/{k}": v for k, v in stats.items()}, **constant,
                   "tokens_per_s": stats["num_tokens"] / max(train_s, 1e-9), "time/train": train_s}
            if (every and done % every == 0) or last:
                row.update(self.evaluate(learner, done))
            if not math.isfinite(stats["loss"]):
                log.warning("step %d: the training loss is not finite (%s)", done, stats["loss"])
            stop = not last and run_dir.stop_requested()
            if (cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0) or last or stop:
                # Durable (core/storage.py): staged, every rank's files verified, COMPLETE last.
                final_ckpt = run_dir.checkpoint_dir(done)
                staging = run_dir.begin_output(final_ckpt)
                learner.save_checkpoint(staging, {"step": done}, cfg.run.storage_options)
                run_dir.finish_output(staging, final_ckpt, learner.num_ranks, f"step {done}\n")
            row["time/step"] = time.perf_counter() - t0
            metrics.write(row)
            if ray_metrics is not None:
                ray_metrics.export(row)
            progress.update(done, row)
            run_dir.sync()
            if stop:
                print(f"fleetrl: stop requested; ended after step {done} with a checkpoint", flush=True)
                run_dir.clear_stop()
                break
        final = run_dir.storage.join(run_dir.uri, "final_model")
        staging = run_dir.begin_output(final)
        learner.save_hf(staging, cfg.run.storage_options)
        run_dir.finish_output(staging, final, 1, "final model\n")
        metrics.close()
        run_dir.sync(force=True)
        print(f"fleetrl: final model (Hugging Face format) in {final}", flush=True)
        return run_dir.location


def place_token_values(values: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[B, T] tensor with values[b] written, in order, at the positions where mask[b] is set (0 elsewhere)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for b, v in enumerate(values):
        where = mask[b].bool()
        if int(where.sum()) != v.numel():
            raise ValueError(f"place_token_values: row {b} has {int(where.sum())} masked positions, "
                             f"{v.numel()} values")
        out[b, where] = v.float()
    return out


def _scored_kind(data: DataConfig) -> str | None:
    """How to read a file of scored feedback: as prompt + completion rows ("sft"; the score column is
    kept in row.extra, and a label column, even a numeric one, is not parsed), unless data.kind says
    otherwise or the rows are preference pairs (held-out pairs stay pairs)."""
    if data.kind != "auto":
        return None
    first = next(iter(read_records(data.path, data.format, data.split, 1)), None)
    return None if first is None or infer_kind(first[1], data) == "preference" else "sft"


def _means(prefix: str, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {prefix + k: v.float().mean().item() for k, v in stats.items()}


def _kto_unpaired_eval(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, float]:
    """Mean implicit reward of each class and the chance that a desirable example outscores an
    undesirable one (pairwise accuracy over all cross pairs; 0.5 = chance)."""
    good, bad = rewards[desirable], rewards[~desirable]
    out = {"eval/rewards/chosen": good.mean().item() if good.numel() else float("nan"),
           "eval/rewards/rejected": bad.mean().item() if bad.numel() else float("nan")}
    out["eval/rewards/margins"] = out["eval/rewards/chosen"] - out["eval/rewards/rejected"]
    if good.numel() and bad.numel():
        out["eval/accuracy"] = (good[:, None] > bad[None, :]).float().mean().item()
    return out


def run_offline(cfg: RunConfig, run_dir: RunDir) -> Path:
    from fleetrl.learner.offline import OfflineLearnerGroup
    from fleetrl.metrics.ray_metrics import RayMetricsExporter

    model_path = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    run = OfflineRun(cfg, run_dir, tokenizer)  # data errors surface before any actor starts
    connect_ray(cfg.ray)
    t0 = time.perf_counter()
    print(f"fleetrl: starting {cfg.learner.num_ranks} learner rank(s) (ZeRO-{cfg.learner.zero_stage}) "
          f"for {cfg.algorithm} on {model_path}", flush=True)
    kw = run.learner_kwargs()
    learner = OfflineLearnerGroup(cfg.learner, model_path, kw["algorithm"], kw["algo_cfg"],
                                  batch_size=cfg.offline.batch_size, total_steps=run.schedule.total_steps,
                                  pad_token_id=kw["pad_token_id"], max_length=kw["max_length"],
                                  name_prefix=run_dir.actor_prefix)
    try:
        print(f"fleetrl: learner ready in {time.perf_counter() - t0:.1f}s", flush=True)
        return run.run(learner, RayMetricsExporter(run_dir.path.name))  # the same rows, on the Ray dashboard
    finally:
        learner.shutdown()
