"""Online RL, one screen per iteration: collect -> batch -> advantages -> train -> sync -> log.

The pieces live next door: collection (online/collect.py), advantages for the configured
algorithm (online/advantages.py, dispatching through fleetrl.algos' registries), held-out
evaluation (online/evaluate.py), weight sync and fleet resizing (online/weights.py) and service
start-up (online/services.py). Algorithms with a critic (PPO) train it on its own ranks while
the policy trains; it gives values at sampling time and is regressed on the GAE returns.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from fleetrl.core.nodes import draining_nodes
from fleetrl.data.rows import PromptStream, load_rows, load_train_eval
from fleetrl.learner.critic import CriticGroup
from fleetrl.learner.group import LearnerGroup
from fleetrl.metrics.local import Progress
from fleetrl.metrics.ray_metrics import RayMetricsExporter
from fleetrl.online.advantages import AdvantageStep, StepAdvantages
from fleetrl.online.batch import completion_stats, episode_stats, pad_samples
from fleetrl.online.collect import GroupCollector, RolloutStats
from fleetrl.online.control import poll_control
from fleetrl.online.draining import drain_leaving_workers, leaving, rank_nodes
from fleetrl.online.evaluate import HeldOutEval
from fleetrl.online.off_policy import OffPolicyCorrection
from fleetrl.online.pairs import pair_batch
from fleetrl.online.recovery import exact_resume_state, recovery_metrics, restore_exact_state
from fleetrl.online.services import Services, check_critic_tokenizer, local_path, process_age_s, start_services
from fleetrl.online.weights import WeightSync, probe_token_ids, resize_fleet
from fleetrl.reward.actor import restart_reward_actor
from fleetrl.run.config import ConfigError, RunConfig
from fleetrl.run.runtime import RunDir, connect_ray, load_tokenizer, pick_backend, resolve_model

log = logging.getLogger("fleetrl")


def run_online(cfg: RunConfig, run_dir: RunDir, restarts: int = 0) -> Path | str:
    """One online run; ``restarts``: how many times the supervisor (online/supervisor.py) has
    started it again so far (``run/restarts`` in the metrics)."""
    connect_ray(cfg.ray)
    cfg = cfg.model_copy(deep=True)
    for fn in cfg.reward.functions:
        if fn.kind == "model":
            fn.model_path = local_path(fn.model_path)
    model_path = local_path(resolve_model(cfg.model.path))
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    rows, eval_rows = load_train_eval(cfg.data, kind="prompt")
    if cfg.eval_data is not None:
        eval_rows = load_rows(cfg.eval_data, kind="prompt")
    stream = PromptStream(rows, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    critic_path = None
    if cfg.online_algorithm.critic:
        critic_path = local_path(resolve_model(cfg.critic_init_path()))
        check_critic_tokenizer(cfg, critic_path, model_path, tokenizer)
    backend = pick_backend(cfg.learner.backend)
    t0 = time.perf_counter()
    services = start_services(cfg, run_dir, model_path, backend, critic_path)
    try:
        return _train(cfg, run_dir, services, tokenizer, stream, backend, t0, eval_rows, restarts)
    finally:
        services.shutdown()


def _startup_metrics(services: Services, since_services_s: float) -> dict[str, float]:
    """time/startup (process start to the first step; else from start_services) and its breakdown."""
    out = dict(services.startup)
    out["startup/after_services"] = since_services_s - out.get("startup/services", 0.0)
    out["time/startup"] = process_age_s() or since_services_s
    return out


def _train(cfg: RunConfig, run_dir: RunDir, services: Services, tokenizer, stream: PromptStream,
           backend: str, t0: float, eval_rows=(), restarts: int = 0) -> Path | str:
    fleet, learner, critic, control = services.fleet, services.learner, services.critic, services.control
    sync = WeightSync(learner, fleet, backend)
    if cfg.rollout.verify_weights:
        sync.probe_ids = probe_token_ids(stream.rows, tokenizer, cfg.rollout.verify_probe_tokens)
    collector = GroupCollector(cfg, fleet, services.reward_actors, stream, tokenizer,
                               fleet_version=lambda: sync.version)
    collector.restore_fleet = lambda: resize_fleet(fleet, sync, collector, max(1, cfg.rollout.num_workers))
    collector.restart_reward_actor = lambda index, dead: restart_reward_actor(
        cfg.reward, index, run_dir.config_dir, run_dir.actor_prefix, dead=dead)
    advantages = AdvantageStep(cfg, learner, critic, services.teacher)
    off_policy = OffPolicyCorrection(cfg, learner)
    evaluator = _evaluator(cfg, services, eval_rows, tokenizer, collector.reward_calls_in_flight)
    start_step = _resume(cfg, run_dir, learner, critic, advantages, collector, sync, services)
    print(f"fleetrl: services ready in {time.perf_counter() - t0:.1f}s", flush=True)

    run_log = _RunLog(cfg, run_dir, start_step, evaluator)
    optimizer_steps, steps_done = start_step * cfg.optimizer_steps_per_step, start_step
    saved_for: set[str] = set()  # draining nodes a checkpoint was already made for (their ranks cannot move)
    for step in range(start_step, cfg.run.steps):
        # Between steps: apply `fleetrl scale` requests, replace workers that died, honour a stop.
        target, stop = poll_control(control)
        if (stop or run_dir.stop_requested()) and step > start_step:
            print(f"fleetrl: stop requested; ending after step {step} with a checkpoint", flush=True)
            run_dir.clear_stop()
            break
        # Workers on a node that is going away leave it (calls finished or handed back); resize_fleet
        # starts their replacements elsewhere. Ranks on one end this step with a checkpoint.
        draining = draining_nodes()
        drain_leaving_workers(fleet, collector, draining)
        ranks_leaving = {name: node for name, node in leaving(rank_nodes(learner, critic), draining).items()
                         if node not in saved_for}
        saved_for.update(ranks_leaving.values())
        resize_fleet(fleet, sync, collector, target)
        control.report.remote(step=step, rollout_workers=fleet.num_workers, weight_version=sync.version)
        step_start = time.perf_counter()
        startup = _startup_metrics(services, step_start - t0) if step == start_step else {}

        # The learner holds version `step`; no group older than rl.max_staleness versions is trained.
        groups, rstats = collector.collect(cfg.rl.prompts_per_step, learner_version=step)
        samples = [s for g in groups for s in g.samples]
        scores = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        if cfg.pairs_per_step:  # online DPO: each group's best vs worst sample (online/pairs.py)
            batch, pair_metrics = pair_batch(samples, cfg.rl.group_size, tokenizer.pad_token_id,
                                             cfg.mini_batch_size)
            adv, correction = StepAdvantages(torch.zeros(0), pair_metrics), {}
        else:
            batch = pad_samples(samples, pad_id=tokenizer.pad_token_id)
            adv = advantages(batch, scores)
            batch["advantages"] = adv.advantages
            correction = off_policy(batch, samples, learner_version=step)

        t = time.perf_counter()
        # The critic trains while the policy does (separate ranks); the policy waits out the
        # critic's warm-up steps. Meanwhile the fleet generates for the coming steps (pump).
        critic_refs = critic.start_train(adv.critic_batch, cfg.mini_batch_size, cfg.rl.epochs) \
            if adv.critic_batch is not None else []
        train_refs = []
        if step >= cfg.critic_warmup_steps and batch is not None:  # None: every group of the step tied
            train_refs = learner.start_train(batch, cfg.mini_batch_size, cfg.rl.epochs,
                                             cfg.rollout.sampling.temperature)
        collector.pump(train_refs + critic_refs, rstats, _train_deadline_s(learner, critic if critic_refs else None),
                       names=learner.rank_names()[:len(train_refs)] + (critic.rank_names() if critic_refs else []))
        train_stats = learner.finish(train_refs) if train_refs else []
        critic_stats = critic.finish(critic_refs) if critic_refs else []
        correction.update(off_policy.from_train(train_stats))
        train_s = time.perf_counter() - t
        optimizer_steps += len(train_stats)

        # A worker that died while idle would break the broadcast: drop it first (replaced next step).
        lost = fleet.remove_dead_workers()
        if lost:
            collector.workers_lost += len(lost)
            log.warning("rollout worker(s) %s died; replaced at the next step", lost)
        sync_s = sync.push(step + 1)

        row = {"step": step + 1, "optimizer_steps": optimizer_steps,
               **_reward_metrics(scores, samples, rstats), **completion_stats(samples), **episode_stats(samples),
               **_mean_stats(train_stats), **_mean_stats(critic_stats, prefix="critic/"), **adv.metrics,
               **correction, **_rollout_metrics(fleet, sync, collector, rstats, samples),
               "time/reference": adv.reference_s, "time/train": train_s, "time/weight_sync": sync_s,
               "time/step": time.perf_counter() - step_start, **startup, **_teacher_share(adv.metrics, step_start),
               **recovery_metrics(collector, restarts)}
        run_log.step(step, row, samples, rstats)
        steps_done = step + 1
        if ranks_leaving:
            print(f"fleetrl: {', '.join(sorted(ranks_leaving))} on a draining node: checkpoint at step "  # noqa: T201
                  f"{steps_done}, so a restart after the node goes loses no step", flush=True)
        if ranks_leaving or (cfg.run.checkpoint_every and steps_done % cfg.run.checkpoint_every == 0):
            save_checkpoint(learner, run_dir, steps_done, sync.version, collector, critic, advantages.kl_ctl,
                            extra=exact_resume_state(services))
        run_dir.sync()
    sync.settle_probe()  # the last version's log-prob probe (it ran while the fleet was idle)
    if run_dir.latest_checkpoint() != run_dir.checkpoint_dir(steps_done):
        save_checkpoint(learner, run_dir, steps_done, sync.version, collector, critic, advantages.kl_ctl,
                        extra=exact_resume_state(services))
    final = save_final_model(learner, run_dir, "final_model")
    if critic is not None:
        save_final_model(critic, run_dir, "final_critic")  # critic.model_path can start a later run from it
    run_log.close()
    run_dir.sync(force=True)
    print(f"fleetrl: final model (Hugging Face format) in {final}", flush=True)
    return run_dir.location


def _teacher_share(metrics: dict[str, float], step_start: float) -> dict[str, float]:
    """opd: the share of the step's time spent scoring with the teacher."""
    if "time/teacher" not in metrics:
        return {}
    return {"time/teacher_share": metrics["time/teacher"] / max(time.perf_counter() - step_start, 1e-9)}


def _train_deadline_s(learner: LearnerGroup, critic: CriticGroup | None) -> float:
    """How long a step's train calls may take: learner.call_timeout_s (the critic's too when it trains
    alongside)."""
    return max(learner.cfg.call_timeout_s, critic.cfg.call_timeout_s if critic is not None else 0.0)


def _evaluator(cfg: RunConfig, services: Services, eval_rows, tokenizer,
               reward_calls_ahead=lambda: 0) -> HeldOutEval | None:
    if not eval_rows:
        return None
    evaluator = HeldOutEval(cfg, services.fleet, services.reward_actors, eval_rows, tokenizer, reward_calls_ahead)
    if not evaluator.prompts:
        raise ConfigError(f"none of the {len(eval_rows)} held-out prompts fits rl.max_prompt_tokens="
                          f"{cfg.rl.max_prompt_tokens}: raise it or check the held-out data")
    return evaluator


def _resume(cfg: RunConfig, run_dir: RunDir, learner: LearnerGroup, critic: CriticGroup | None,
            advantages: AdvantageStep, collector: GroupCollector, sync: WeightSync,
            services: Services | None = None) -> int:
    """The step to start from: 0, or the last finished checkpoint's with every service restored."""
    if not cfg.run.resume:
        return 0
    if (ckpt := run_dir.latest_checkpoint()) is None:
        run_dir.truncate_logs(0)  # a restart before the first checkpoint redoes every step
        return 0
    options = cfg.run.storage_options
    state = learner.load_checkpoint(ckpt, options)
    if critic is not None:
        critic.load_checkpoint(run_dir.storage.join(ckpt, "critic"), options)
    if advantages.kl_ctl is not None and "kl_coef" in state:
        advantages.kl_ctl.value = float(state["kl_coef"])
    collector.load_state_dict(state["collector"])
    if services is not None:
        restore_exact_state(services, state)
    start_step = state["step"]
    run_dir.truncate_logs(start_step)
    sync.push(state["weight_version"])
    print(f"fleetrl: resumed from {ckpt} at step {start_step}", flush=True)
    return start_step


def _reward_metrics(scores: torch.Tensor, samples, rstats: RolloutStats) -> dict[str, float]:
    # Per-function means over the trained samples, like reward/mean: with async rollouts a step
    # may train only groups scored in earlier steps, so this step's scoring stats can be empty.
    per_function: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for name, value in s.reward_parts.items():
            per_function[name].append(value)
    return {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        **{f"reward/{name}": sum(v) / len(v) for name, v in per_function.items()},
        "reward/errors": rstats.reward_errors,
        "reward/skipped": rstats.reward_skipped,
        "reward/hung_calls": rstats.reward_hung_calls,
    }


def _rollout_metrics(fleet, sync: WeightSync, collector: GroupCollector, rstats: RolloutStats,
                     samples) -> dict[str, float]:
    return {
        "tokens_per_s": rstats.generated_tokens / max(rstats.generate_s, 1e-9),
        "weight_version": sync.version,
        "weight_sync/verify_failed": sync.verify_failed,
        "weight_sync/verify_s": sync.verify_s,
        "weight_sync/probe_abs_diff": sync.probe_abs_diff,
        "weight_sync/probe_max_abs_diff": sync.probe_max_abs_diff,
        "weight_sync/probe_s": sync.probe_s,
        "rollout/num_workers": fleet.num_workers,
        "prompts_in_flight": rstats.max_prompts_in_flight,
        "queue_depth/reward": rstats.max_reward_queue,
        "rollout/workers_lost": collector.workers_lost + sync.workers_dropped,
        "rollout/workers_drained": collector.workers_drained,
        # Versions the trained groups lagged the learner by (the oldest weights any token came from).
        "staleness/mean": sum(rstats.staleness) / len(rstats.staleness),
        "staleness/max": max(rstats.staleness),
        "buffer/depth": len(collector.buffer),
        "groups/dropped_stale": rstats.groups_dropped_stale,
        "rollout/in_flight_updates": sum(s.updated_in_flight for s in samples),
        "time/learner_wait": rstats.learner_wait_s,  # the learner waiting for scored groups
        "time/fleet_idle": rstats.fleet_idle_s,  # nothing generating while the learner trained
        "prompts/skipped_too_long": rstats.prompts_skipped_too_long,
        "groups/skipped_constant": rstats.groups_skipped_constant,
        "time/generate": rstats.generate_s,
        "time/reward": rstats.reward_s,
        "time/reward_wait": rstats.reward_wait_s,
    }


class _RunLog:
    """Where a step's numbers go: metrics.jsonl (+ TensorBoard / W&B), the Ray dashboard, the
    console progress line, samples.jsonl (run.log_samples); runs the held-out evaluation when due."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, start_step: int, evaluator: HeldOutEval | None):
        self.cfg, self.evaluator = cfg, evaluator
        self.metrics = run_dir.metrics_writer(cfg, append=start_step > 0)
        self.ray_metrics = RayMetricsExporter(run_dir.path.name)  # the same numbers, on the Ray dashboard
        self.progress = Progress(total=cfg.run.steps, start=start_step)
        if evaluator is not None and start_step == 0:
            self.metrics.write({"step": 0, **self._evaluate(0)})  # the starting point, before any update
        self.samples = open(run_dir.path / "samples.jsonl", "a") if cfg.run.log_samples else None

    def _evaluate(self, step: int) -> dict[str, float]:
        out = self.evaluator.run()
        print(f"fleetrl: eval at step {step}: reward {out['eval/reward/mean']:.4g} on {out['eval/prompts']} "
              f"held-out prompts ({out['time/eval']:.1f}s)", flush=True)
        return out

    def step(self, step: int, row: dict, samples, rstats: RolloutStats) -> None:
        every, done = self.cfg.rl.eval_every, step + 1
        if self.evaluator is not None and ((every and done % every == 0) or done == self.cfg.run.steps):
            row.update(self._evaluate(done))
        self.metrics.write(row)
        self.ray_metrics.export(row)
        if self.samples is not None:
            for smp in samples:
                self.samples.write(json.dumps({
                    "step": done, "prompt_index": smp.prompt_index, "worker": smp.worker_index,
                    "weight_version": smp.weight_version, "last_weight_version": smp.last_weight_version,
                    "reward": smp.reward, "prompt": smp.prompt_text,
                    "completion": smp.completion_text, "finish_reason": smp.finish_reason,
                    **_episode_record(smp)}) + "\n")
            self.samples.flush()
        for example in rstats.reward_error_examples:
            log.warning("reward error (scored 0): %s", example)
        self.progress.update(done, row)

    def close(self) -> None:
        self.metrics.close()
        if self.samples is not None:
            self.samples.close()


def save_checkpoint(learner: LearnerGroup, run_dir: RunDir, step: int, version: int,
                    collector: GroupCollector, critic: CriticGroup | None = None, kl_ctl=None,
                    extra: dict | None = None) -> None:
    """A durable checkpoint (core/storage.py): ranks write to a staging location, the driver verifies
    every rank's files, publishes it with COMPLETE last, and deletes what run.keep_last drops.
    ``extra``: more client state (exact_resume_state: RNG states, reward stats, fleet size)."""
    final = run_dir.checkpoint_dir(step)
    staging = run_dir.begin_output(final)
    options = run_dir.storage.options
    state = {"step": step, "weight_version": version, "collector": collector.state_dict(), **(extra or {})}
    if kl_ctl is not None:
        state["kl_coef"] = kl_ctl.value
    learner.save_checkpoint(staging, state, options)
    ranks = {"": learner.num_ranks}
    if critic is not None:
        critic.save_checkpoint(run_dir.storage.join(staging, "critic"), None, options)
        ranks["critic"] = critic.num_ranks
    # The same collector state, readable: the prompts started but not trained at this step (they are
    # generated again on resume), the data cursor, the admission count.
    run_dir.storage.write_text(run_dir.storage.join(staging, "collector.json"),
                               json.dumps(state["collector"], indent=1) + "\n")
    run_dir.finish_output(staging, final, ranks, f"step {step}\n")


def save_final_model(learner, run_dir: RunDir, name: str) -> str:
    """``run_dir/name`` in Hugging Face format, written by rank 0, verified and published like a checkpoint."""
    final = run_dir.storage.join(run_dir.uri, name)
    staging = run_dir.begin_output(final)
    learner.save_hf(staging, run_dir.storage.options)
    run_dir.finish_output(staging, final, 1, "final model\n")
    return final


def _episode_record(smp) -> dict:
    """A multi-turn sample's episode in samples.jsonl: its messages, turn rewards and exact tokens."""
    if smp.episode is None:
        return {}
    return {"episode": {k: smp.episode[k] for k in ("turns", "turn_rewards", "env_error", "messages")},
            "prompt_ids": smp.prompt_ids, "completion_ids": smp.completion_ids,
            "completion_mask": smp.completion_mask}


def _mean_stats(stats: list[dict], prefix: str = "train/") -> dict[str, float]:
    """Average the learner's per-optimizer-step stats over this step's optimizer steps."""
    if not stats:
        return {}
    keys = stats[0].keys()
    out = {}
    for k in keys:
        vals = [float(s[k]) for s in stats if k in s and s[k] is not None]
        if vals:
            out[f"{prefix}{k}"] = sum(vals) / len(vals)
    if "grad_norm" in keys and any(not math.isfinite(float(s["grad_norm"])) for s in stats):
        log.warning("non-finite grad norm in this step's optimizer steps")
    return out
