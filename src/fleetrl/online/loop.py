"""Online RL: stream prompts to the fleet, score groups, compute advantages, train, sync weights.

Group algorithms (GRPO, Dr.GRPO, RLOO) give each sample one advantage from its group's rewards.
Token algorithms (PPO with a critic, REINFORCE++, REINFORCE++ with a group baseline) put each
sample's score on its last token, a KL penalty on every token, and give every token its own
advantage (orchestrator/token_rl.py); PPO's critic is a second DeepSpeed group (learner/critic.py)
that gives values at sampling time and is regressed on the GAE returns.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from fleetrl.algos.advantages import grpo_advantages, rloo_advantages
from fleetrl.algos.losses import kl_estimate
from fleetrl.data.rows import PromptStream, load_rows, load_train_eval, render_prompt
from fleetrl.learner.critic import CriticGroup
from fleetrl.learner.group import LearnerGroup
from fleetrl.metrics.local import Progress
from fleetrl.metrics.ray_metrics import RayMetricsExporter
from fleetrl.online.batch import Group, Sample, completion_stats, pad_samples
from fleetrl.online.control import start_control_actor
from fleetrl.online.token_rl import (
    completion_mask,
    critic_batch,
    make_kl_controller,
    token_advantages,
    token_kl,
)
from fleetrl.reward.actor import make_reward_actors
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import TOKEN_ALGORITHMS, ConfigError, RunConfig
from fleetrl.run.runtime import RunDir, connect_ray, load_tokenizer, pick_backend, resolve_model

log = logging.getLogger("fleetrl")


@dataclass
class RolloutStats:
    """What happened while one step's groups were collected; lands in the metrics."""

    generate_s: float = 0.0  # from the first request to the last completion back
    reward_wait_s: float = 0.0  # from the last completion back to the last score back
    reward_s: float = 0.0  # scoring time summed over reward actors (overlaps generation)
    generated_tokens: int = 0
    prompts_skipped_too_long: int = 0
    groups_skipped_constant: int = 0
    reward_errors: int = 0
    max_prompts_in_flight: int = 0  # prompts at the fleet whose completions had not come back
    max_reward_queue: int = 0  # scoring calls waiting at the reward actors
    reward_error_examples: list[str] = field(default_factory=list)
    per_function: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class GroupCollector:
    """Keeps the fleet busy from the prompt stream and hands back fully scored groups.

    Each generate call carries a few prompts with n = group_size, so a prompt's group is complete
    when its call returns; it goes to the reward service at once (no barrier on the slowest call).
    """

    def __init__(self, cfg: RunConfig, fleet: RolloutFleet, reward_actors, stream: PromptStream, tokenizer):
        self.cfg = cfg
        self.fleet = fleet
        self.reward_actors = reward_actors
        self.stream = stream
        self.tokenizer = tokenizer
        self.sampling = cfg.rollout.sampling.model_dump()
        self._gen_refs: dict[Any, list[tuple[int, Any, str, list[int]]]] = {}
        self._reward_refs: dict[Any, list[Group]] = {}
        self._next_reward_actor = 0
        self._carry: list[Group] = []  # scored groups beyond what a step needed: used next step
        self._retry: list[list[tuple[int, Any, str, list[int]]]] = []  # prompts of calls that were lost
        self._prompts_submitted = 0
        self.workers_lost = 0
        self.restore_fleet = None  # set by the loop: brings a fleet that lost every worker back

    def _next_prompts(self, k: int, stats: RolloutStats) -> list[tuple[int, Any, str, list[int]]]:
        out = []
        while len(out) < k:
            _epoch, _index, row = next(self.stream)
            text = render_prompt(row, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.cfg.rl.max_prompt_tokens:
                stats.prompts_skipped_too_long += 1
                continue
            out.append((self._prompts_submitted, row, text, ids))
            self._prompts_submitted += 1
        return out

    def _submit_generation(self, stats: RolloutStats) -> None:
        batch = self._retry.pop(0) if self._retry else self._next_prompts(self.cfg.rl.prompts_per_request, stats)
        ref = self.fleet.submit(
            [ids for _, _, _, ids in batch],
            n=self.cfg.rl.group_size,
            sampling=self.sampling,
            request_ids=[i for i, _, _, _ in batch],
        )
        self._gen_refs[ref] = batch

    def requeue(self, works) -> None:
        """Calls a worker handed back unfinished: their prompts are generated again elsewhere."""
        for work in works:
            for ref, batch in list(self._gen_refs.items()):
                if [i for i, _, _, _ in batch] == list(work.request_ids):
                    self._retry.append(self._gen_refs.pop(ref))

    def _on_generated(self, ref, stats: RolloutStats) -> None:
        work = self.fleet.on_done(ref)
        batch = self._gen_refs.pop(ref)
        try:
            completions = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            # A dead worker loses no prompt: its calls go to the others (each of its calls lands here).
            self._retry.append(batch)
            index = work.worker_index if work is not None else None
            if index is not None and index in self.fleet.book.indices():
                self.workers_lost += 1
                log.warning("rollout worker %s died (%s); its prompts go to the other workers and it is "
                            "replaced at the next step", index, type(e).__name__)
                self.fleet.remove_worker(index, wait=True, timeout_s=0)
            if self.fleet.num_workers == 0 and self.restore_fleet is not None:
                self.restore_fleet()
            return
        by_request: dict[int, list] = defaultdict(list)
        for c in completions:
            by_request[c.request_id].append(c)
        groups = []
        for prompt_index, row, text, ids in batch:
            samples = []
            for c in sorted(by_request[prompt_index], key=lambda c: c.sample_index):
                samples.append(
                    Sample(
                        prompt_index=prompt_index,
                        prompt_text=text,
                        prompt_ids=list(ids),
                        completion_ids=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        finish_reason=c.finish_reason,
                        weight_version=c.weight_version,
                        # The fleet returns token ids only; reward functions read text.
                        completion_text=self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                        worker_index=c.worker_index,
                    )
                )
                stats.generated_tokens += len(c.token_ids)
            groups.append(Group(prompt_index, row, samples))
        self._score(groups)

    def _score(self, groups: list[Group]) -> None:
        samples = [(g, s) for g in groups for s in g.samples]
        columns: dict[str, list] = defaultdict(list)
        for g, _ in samples:
            for k, v in g.row.extra.items():
                columns[k].append(v)
        # Every row of a call must carry the same extra columns; pad missing ones with None.
        for k in columns:
            if len(columns[k]) != len(samples):
                columns[k] = [g.row.extra.get(k) for g, _ in samples]
        actor = self.reward_actors[self._next_reward_actor % len(self.reward_actors)]
        self._next_reward_actor += 1
        ref = actor.score.remote(
            [s.prompt_text for _, s in samples], [s.completion_text for _, s in samples], dict(columns)
        )
        self._reward_refs[ref] = groups

    def _on_scored(self, ref, stats: RolloutStats) -> list[Group]:
        groups = self._reward_refs.pop(ref)
        result = ray.get(ref)  # a RewardError (on_error: fail) surfaces here with its message
        samples = [s for g in groups for s in g.samples]
        for i, s in enumerate(samples):
            s.reward = float(result.rewards[i])
            s.reward_parts = {name: float(vals[i]) for name, vals in result.per_function.items()}
        for name, vals in result.per_function.items():
            stats.per_function[name].extend(float(v) for v in vals)
        stats.reward_s += sum(result.seconds.values())
        stats.reward_errors += len(result.errors)
        for e in result.errors[:3]:
            stats.reward_error_examples.append(f"{e.function}: {e.message}")
        if not self.cfg.rl.skip_constant_groups:
            return groups
        kept = [g for g in groups if len(set(g.rewards)) > 1]
        stats.groups_skipped_constant += len(groups) - len(kept)
        return kept

    def collect(self, num_groups: int) -> tuple[list[Group], RolloutStats]:
        stats = RolloutStats()
        done: list[Group] = self._carry[:num_groups]
        self._carry = self._carry[num_groups:]
        start = time.perf_counter()
        last_generated = start

        def groups_pending() -> int:
            return sum(len(b) for b in self._gen_refs.values()) + sum(len(g) for g in self._reward_refs.values())

        while len(done) < num_groups:
            # Keep the fleet busy, but never ask for more prompts than the step still needs.
            while self.fleet.idle_capacity() > 0 and len(done) + groups_pending() < num_groups:
                self._submit_generation(stats)
            stats.max_prompts_in_flight = max(stats.max_prompts_in_flight,
                                              sum(len(b) for b in self._gen_refs.values()))
            stats.max_reward_queue = max(stats.max_reward_queue, len(self._reward_refs))
            pending = list(self._gen_refs) + list(self._reward_refs)
            ready, _ = ray.wait(pending, num_returns=1)
            for ref in ready:
                if ref in self._gen_refs:
                    self._on_generated(ref, stats)
                    last_generated = time.perf_counter()
                else:
                    done.extend(self._on_scored(ref, stats))
        # Whole calls may bring more groups than needed: keep the rest for the next step.
        self._carry.extend(done[num_groups:])
        stats.generate_s = last_generated - start
        stats.reward_wait_s = time.perf_counter() - last_generated
        return done[:num_groups], stats

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "prompts_submitted": self._prompts_submitted}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self._prompts_submitted = state["prompts_submitted"]


def compute_advantages(cfg: RunConfig, groups: list[Group]) -> torch.Tensor:
    """One advantage per sample, groups contiguous in the order of ``groups``."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    if cfg.algorithm == "rloo":
        return rloo_advantages(rewards, cfg.rl.group_size)
    scale = cfg.rl.advantage_std or ("none" if cfg.algorithm == "drgrpo" else "group")
    return grpo_advantages(rewards, cfg.rl.group_size, scale=scale)


class HeldOutEval:
    """Completions of held-out prompts (one each, at rl.eval_temperature: 0 = greedy) from the
    fleet, scored by the reward service: the reward a policy gets on prompts it never trains on."""

    def __init__(self, cfg: RunConfig, fleet: RolloutFleet, reward_actors, rows, tokenizer):
        self.cfg, self.fleet, self.reward_actors = cfg, fleet, reward_actors
        self.sampling = {**cfg.rollout.sampling.model_dump(), "temperature": cfg.rl.eval_temperature}
        self.prompts: list[tuple[Any, str, list[int]]] = []
        self.skipped_too_long = 0
        for row in rows:
            text = render_prompt(row, tokenizer)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > cfg.rl.max_prompt_tokens:
                self.skipped_too_long += 1
                continue
            self.prompts.append((row, text, ids))
        self.prompts = self.prompts[: cfg.rl.eval_max_prompts]
        self.tokenizer = tokenizer

    def _generate(self) -> list[Any]:
        """One completion per prompt, in prompt order (a call lost with its worker is sent again)."""
        size = self.cfg.rl.prompts_per_request
        queue = [list(range(i, min(i + size, len(self.prompts)))) for i in range(0, len(self.prompts), size)]
        pending: dict[Any, list[int]] = {}
        out: list[Any] = [None] * len(self.prompts)
        while queue or pending:
            while queue and self.fleet.idle_capacity() > 0:
                chunk = queue.pop(0)
                ref = self.fleet.submit([self.prompts[i][2] for i in chunk], n=1, sampling=self.sampling,
                                        request_ids=[f"eval-{i}" for i in chunk])
                pending[ref] = chunk
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                chunk = pending.pop(ref)
                work = self.fleet.on_done(ref)
                try:
                    completions = ray.get(ref)
                except ray.exceptions.RayActorError:
                    queue.append(chunk)
                    if work is not None and work.worker_index in self.fleet.book.indices():
                        self.fleet.remove_worker(work.worker_index, wait=True, timeout_s=0)
                    if self.fleet.num_workers == 0:
                        raise RuntimeError("every rollout worker died during evaluation") from None
                    continue
                for c in completions:
                    out[int(str(c.request_id).removeprefix("eval-"))] = c
        return out

    def run(self) -> dict[str, float]:
        start = time.perf_counter()
        completions = self._generate()
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        prompts = [text for _, text, _ in self.prompts]
        columns: dict[str, list] = defaultdict(list)
        for key in {k for row, _, _ in self.prompts for k in row.extra}:
            columns[key] = [row.extra.get(key) for row, _, _ in self.prompts]
        # Split the scoring over the reward actors.
        k = len(self.reward_actors)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        refs = [a.score.remote(prompts[lo:hi], texts[lo:hi], {c: v[lo:hi] for c, v in columns.items()})
                for a, lo, hi in zip(self.reward_actors, bounds, bounds[1:]) if hi > lo]
        results = ray.get(refs)
        rewards = [r for res in results for r in res.rewards]
        per_function: dict[str, list[float]] = defaultdict(list)
        for res in results:
            for name, vals in res.per_function.items():
                per_function[name].extend(vals)
        lengths = [len(c.token_ids) for c in completions]
        return {
            "eval/reward/mean": sum(rewards) / len(rewards),
            **{f"eval/reward/{name}": sum(v) / len(v) for name, v in per_function.items()},
            "eval/reward/errors": sum(len(res.errors) for res in results),
            "eval/response_length/mean": sum(lengths) / len(lengths),
            "eval/prompts": len(prompts),
            "time/eval": time.perf_counter() - start,
        }


class WeightSync:
    """Learner rank 0 -> every vLLM worker, over a side group; bumps the fleet's weight version."""

    def __init__(self, learner: LearnerGroup, fleet: RolloutFleet, backend: str):
        self.learner = learner
        self.fleet = fleet
        self.backend = backend
        self.version = 0
        self._plan = None
        self.connect()

    def connect(self) -> None:
        """(Re)build the side group; needed again whenever the fleet's membership changes."""
        host, port = self.learner.side_group_address()
        world = self.fleet.weight_group_world_size()
        refs = self.learner.init_weight_sync(host, port, world, self.backend)
        refs += self.fleet.init_weight_group(host, port, self.backend)
        ray.get(refs)
        self._members = tuple(self.fleet.book.indices())

    def push(self, version: int) -> float:
        start = time.perf_counter()
        if tuple(self.fleet.book.indices()) != self._members:  # a worker died during the step
            self.connect()
        if self._plan is None:
            self._plan = self.learner.weight_plan(version)
        plan = type(self._plan)(version=version, buckets=self._plan.buckets)
        ray.get(self.learner.send_weights(plan) + self.fleet.receive_weights(plan))
        self.version = version
        return time.perf_counter() - start


def resize_fleet(fleet: RolloutFleet, sync: WeightSync, collector: GroupCollector, target: int) -> None:
    """Grow or shrink the fleet between steps. Removed workers finish their calls first (nothing is
    lost); new workers load the current weights before they take a prompt."""
    if target == fleet.num_workers:
        return
    before = fleet.num_workers
    while fleet.num_workers > target:
        collector.requeue(fleet.remove_worker(max(fleet.book.indices()), wait=True))
    while fleet.num_workers < target:
        fleet.add_worker()
    fleet.wait_ready()
    sync.connect()
    sync.push(sync.version)
    print(f"fleetrl: rollout fleet {before} -> {fleet.num_workers} worker(s), weights at version {sync.version}",
          flush=True)


@dataclass
class Services:
    """The Ray actors of one online run; ``shutdown`` frees them (and their names) on any exit."""

    fleet: RolloutFleet
    reward_actors: list
    learner: LearnerGroup
    control: Any = None  # the run's named RunControl actor (fleetrl scale talks to it)
    critic: CriticGroup | None = None  # ppo only

    def shutdown(self) -> None:
        critic = self.critic.shutdown if self.critic is not None else (lambda: None)
        for stop in (self.fleet.shutdown, critic, self.learner.shutdown,
                     lambda: [ray.kill(a) for a in self.reward_actors + [self.control] if a is not None]):
            try:
                stop()
            except Exception as e:  # keep freeing the others; the run's own error matters more
                log.warning("while shutting down: %s", e)


def start_services(cfg: RunConfig, run_dir: RunDir, model_path: str, backend: str,
                   critic_path: str | None = None) -> Services:
    """The fleet, the policy learner, the reward actors and (ppo, from `critic_path`) the critic."""
    with_critic = cfg.algorithm == "ppo"
    critic_note = f", {cfg.critic.learner_config(cfg.learner).num_ranks} critic rank(s) " \
                  f"({cfg.critic.placement}) from {critic_path}" if with_critic else ""
    print(f"fleetrl: starting {cfg.rollout.num_workers} rollout worker(s), {cfg.reward.num_workers} reward "
          f"worker(s), {cfg.learner.num_ranks} learner rank(s) [{backend}] on {model_path}{critic_note}", flush=True)
    prefix = run_dir.actor_prefix
    total_steps = cfg.run.steps * cfg.optimizer_steps_per_step
    colocate = with_critic and cfg.critic.placement == "colocate"
    started: list[Any] = []

    def stop_started() -> None:
        for service in reversed(started):
            service.shutdown()

    # Actor creation is asynchronous: the services start side by side.
    fleet = RolloutFleet(cfg.rollout, model_path, name_prefix=prefix)
    started.append(fleet)
    try:
        learner = LearnerGroup(cfg.learner, model_path, total_steps=total_steps,
                               mini_batch_size=cfg.mini_batch_size, name_prefix=prefix, wait=False,
                               reserve=CriticGroup.reserve(cfg.critic, cfg.learner) if colocate else None)
        started.append(learner)
        critic = None
        if with_critic:
            critic = CriticGroup(cfg.critic, cfg.learner, critic_path, total_steps=total_steps,
                                 mini_batch_size=cfg.mini_batch_size, name_prefix=prefix,
                                 colocate_with=learner if colocate else None, wait=False)
            started.append(critic)
        reward_actors = make_reward_actors(cfg.reward, base_dir=str(run_dir.config_dir), name_prefix=prefix)
    except BaseException:
        stop_started()
        raise
    services = Services(fleet, reward_actors, learner, start_control_actor(prefix, cfg.rollout.num_workers),
                        critic=critic)
    try:
        learner.wait_ready()
        if critic is not None:
            critic.wait_ready()
        fleet.wait_ready()
    except BaseException:
        services.shutdown()
        raise
    return services


def _local_path(path: str) -> str:
    """An existing local path made absolute (actors run in other working directories); else unchanged."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _check_critic_tokenizer(cfg: RunConfig, critic_path: str, policy_path: str, tokenizer) -> None:
    """A critic started from a reward model reads the policy's token ids: the vocabularies must agree."""
    if critic_path == policy_path:
        return
    theirs = load_tokenizer(critic_path)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the critic starts from {critic_path} (critic.init: {cfg.critic.init}), whose tokenizer differs "
            f"from the policy's ({policy_path}); the critic reads the policy's token ids. Use critic.init: policy "
            "or point critic.model_path at a model with the policy's tokenizer"
        )


def run_online(cfg: RunConfig, run_dir: RunDir) -> Path:
    connect_ray(cfg.ray)
    cfg = cfg.model_copy(deep=True)
    for fn in cfg.reward.functions:
        if fn.kind == "model":
            fn.model_path = _local_path(fn.model_path)
    model_path = _local_path(resolve_model(cfg.model.path))
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path)
    rows, eval_rows = load_train_eval(cfg.data, kind="prompt")
    if cfg.eval_data is not None:
        eval_rows = load_rows(cfg.eval_data, kind="prompt")
    stream = PromptStream(rows, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    critic_path = None
    if cfg.algorithm == "ppo":
        critic_path = _local_path(resolve_model(cfg.critic_init_path()))
        _check_critic_tokenizer(cfg, critic_path, model_path, tokenizer)
    backend = pick_backend(cfg.learner.backend)
    t0 = time.perf_counter()
    services = start_services(cfg, run_dir, model_path, backend, critic_path)
    try:
        return _train(cfg, run_dir, services, tokenizer, stream, backend, t0, eval_rows)
    finally:
        services.shutdown()


def _train(cfg: RunConfig, run_dir: RunDir, services: Services, tokenizer, stream: PromptStream,
           backend: str, t0: float, eval_rows=()) -> Path:
    fleet, learner, critic = services.fleet, services.learner, services.critic
    sync = WeightSync(learner, fleet, backend)
    collector = GroupCollector(cfg, fleet, services.reward_actors, stream, tokenizer)
    control = services.control
    collector.restore_fleet = lambda: resize_fleet(fleet, sync, collector, max(1, cfg.rollout.num_workers))
    per_token = cfg.algorithm in TOKEN_ALGORITHMS
    kl_ctl = make_kl_controller(cfg) if per_token else None
    evaluator = HeldOutEval(cfg, fleet, services.reward_actors, eval_rows, tokenizer) if eval_rows else None
    if evaluator is not None and not evaluator.prompts:
        raise ConfigError(f"none of the {len(eval_rows)} held-out prompts fits rl.max_prompt_tokens="
                          f"{cfg.rl.max_prompt_tokens}: raise it or check the held-out data")

    start_step = 0
    if cfg.run.resume and (ckpt := run_dir.latest_checkpoint()) is not None:
        state = learner.load_checkpoint(str(ckpt))
        if critic is not None:
            critic.load_checkpoint(str(ckpt / "critic"))
        if kl_ctl is not None and "kl_coef" in state:
            kl_ctl.value = float(state["kl_coef"])
        collector.load_state_dict(state["collector"])
        start_step = state["step"]
        run_dir.truncate_logs(start_step)
        sync.push(state["weight_version"])
        print(f"fleetrl: resumed from {ckpt} at step {start_step}", flush=True)
    print(f"fleetrl: services ready in {time.perf_counter() - t0:.1f}s", flush=True)

    metrics = run_dir.metrics_writer(cfg, append=start_step > 0)
    ray_metrics = RayMetricsExporter(run_dir.path.name)  # the same numbers, on the Ray dashboard
    progress = Progress(total=cfg.run.steps, start=start_step)
    use_ref = cfg.learner.reference and cfg.learner.loss.kl_coef > 0
    temperature = cfg.rollout.sampling.temperature
    optimizer_steps = start_step * cfg.optimizer_steps_per_step
    steps_done = start_step
    lc = cfg.learner.loss

    def evaluate(step: int) -> dict[str, float]:
        out = evaluator.run()
        print(f"fleetrl: eval at step {step}: reward {out['eval/reward/mean']:.4g} on {out['eval/prompts']} "
              f"held-out prompts ({out['time/eval']:.1f}s)", flush=True)
        return out

    if evaluator is not None and start_step == 0:
        metrics.write({"step": 0, **evaluate(0)})  # the starting point, before any update

    samples_log = open(run_dir.path / "samples.jsonl", "a") if cfg.run.log_samples else None
    for step in range(start_step, cfg.run.steps):
        # Between steps: apply `fleetrl scale` requests, replace workers that died, honour a stop.
        target, stop = ray.get(control.poll.remote())
        if stop and step > start_step:
            print(f"fleetrl: stop requested; ending after step {step}", flush=True)
            break
        resize_fleet(fleet, sync, collector, target)
        control.report.remote(step=step, rollout_workers=fleet.num_workers, weight_version=sync.version)
        step_start = time.perf_counter()
        groups, rstats = collector.collect(cfg.rl.prompts_per_step)
        samples = [s for g in groups for s in g.samples]
        batch = pad_samples(samples, pad_id=tokenizer.pad_token_id)
        raw_rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)

        t = time.perf_counter()
        algo_metrics: dict[str, float] = {}
        if use_ref:
            batch["ref_logprobs"] = learner.compute_logprobs(batch, which="reference", temperature=temperature)
            if lc.kl_in == "reward" and not per_token:
                # KL of the sampled sequence against the reference, subtracted from its reward.
                kl_tok = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], lc.kl_estimator)
                kl_seq = (kl_tok * batch["loss_mask"]).sum(-1)
                for s, k in zip(samples, kl_seq.tolist()):
                    s.reward = s.reward - lc.kl_coef * k
                algo_metrics["kl/reward_penalty_mean"] = (lc.kl_coef * kl_seq).mean().item()
        ref_s = time.perf_counter() - t

        critic_data = None
        if per_token:
            t = time.perf_counter()
            values = critic.compute_values(batch) if critic is not None else None
            algo_metrics["time/critic_values"] = time.perf_counter() - t
            result = token_advantages(
                cfg.algorithm, cfg.token_rl, raw_rewards, completion_mask(batch),
                token_kl(batch, lc.kl_estimator) if "ref_logprobs" in batch else None,
                kl_ctl.value if lc.kl_in == "reward" else 0.0, cfg.rl.group_size, values)
            advantages = result.advantages
            algo_metrics.update(result.metrics)
            if critic is not None:
                critic_data = critic_batch(batch, values, result.returns)
            if "kl/seq_mean" in result.metrics:
                kl_ctl.update(result.metrics["kl/seq_mean"], n_steps=len(samples))
        else:
            advantages = compute_advantages(cfg, groups)
            algo_metrics["advantage/mean"] = advantages.mean().item()
            algo_metrics["advantage/std"] = advantages.std().item() if len(advantages) > 1 else 0.0
        batch["advantages"] = advantages

        t = time.perf_counter()
        # The critic trains while the policy does (separate ranks); the policy waits out the
        # critic's warm-up steps.
        critic_refs = critic.start_train(critic_data, cfg.mini_batch_size, cfg.rl.epochs) \
            if critic_data is not None else None
        train_stats = []
        if not (cfg.algorithm == "ppo" and step < cfg.ppo.critic_warmup_steps):
            train_stats = learner.train(batch, mini_batch_size=cfg.mini_batch_size, epochs=cfg.rl.epochs,
                                        temperature=temperature)
        critic_stats = critic.finish(critic_refs) if critic_refs is not None else []
        train_s = time.perf_counter() - t
        optimizer_steps += len(train_stats)

        # A worker that died while idle would break the broadcast: drop it first (replaced next step).
        lost = fleet.remove_dead_workers()
        if lost:
            collector.workers_lost += len(lost)
            log.warning("rollout worker(s) %s died; replaced at the next step", lost)
        sync_s = sync.push(step + 1)
        step_s = time.perf_counter() - step_start

        versions = [s.weight_version for s in samples]
        row = {
            "step": step + 1,
            "optimizer_steps": optimizer_steps,
            "reward/mean": raw_rewards.mean().item(),
            "reward/std": raw_rewards.std().item() if len(raw_rewards) > 1 else 0.0,
            **{f"reward/{name}": sum(v) / len(v) for name, v in rstats.per_function.items() if v},
            "reward/errors": rstats.reward_errors,
            **completion_stats(samples),
            **_mean_stats(train_stats),
            **_mean_stats(critic_stats, prefix="critic/"),
            **algo_metrics,
            "tokens_per_s": rstats.generated_tokens / max(rstats.generate_s, 1e-9),
            "weight_version": sync.version,
            "rollout/num_workers": fleet.num_workers,
            "prompts_in_flight": rstats.max_prompts_in_flight,
            "queue_depth/reward": rstats.max_reward_queue,
            "rollout/workers_lost": collector.workers_lost,
            "staleness/max": sync.version - 1 - min(versions),
            "prompts/skipped_too_long": rstats.prompts_skipped_too_long,
            "groups/skipped_constant": rstats.groups_skipped_constant,
            "time/generate": rstats.generate_s,
            "time/reward": rstats.reward_s,
            "time/reward_wait": rstats.reward_wait_s,
            "time/reference": ref_s,
            "time/train": train_s,
            "time/weight_sync": sync_s,
            "time/step": step_s,
        }
        if evaluator is not None and ((cfg.rl.eval_every and (step + 1) % cfg.rl.eval_every == 0)
                                      or step + 1 == cfg.run.steps):
            row.update(evaluate(step + 1))
        metrics.write(row)
        ray_metrics.export(row)
        if samples_log is not None:
            for smp in samples:
                samples_log.write(json.dumps({
                    "step": step + 1, "prompt_index": smp.prompt_index, "worker": smp.worker_index,
                    "weight_version": smp.weight_version, "reward": smp.reward, "prompt": smp.prompt_text,
                    "completion": smp.completion_text, "finish_reason": smp.finish_reason}) + "\n")
            samples_log.flush()
        for example in rstats.reward_error_examples:
            log.warning("reward error (scored 0): %s", example)
        progress.update(step + 1, row)

        steps_done = step + 1
        if cfg.run.save_every and steps_done % cfg.run.save_every == 0:
            save_checkpoint(learner, run_dir, steps_done, sync.version, collector, critic, kl_ctl)
    if run_dir.latest_checkpoint() != run_dir.checkpoint_dir(steps_done):
        save_checkpoint(learner, run_dir, steps_done, sync.version, collector, critic, kl_ctl)
    final = run_dir.path / "final_model"
    learner.save_hf(str(final))
    if critic is not None:
        critic.save_hf(str(run_dir.path / "final_critic"))  # critic.model_path can start a later run from it
    metrics.close()
    if samples_log is not None:
        samples_log.close()
    print(f"fleetrl: final model (Hugging Face format) in {final}", flush=True)
    return run_dir.path


def save_checkpoint(learner: LearnerGroup, run_dir: RunDir, step: int, version: int,
                    collector: GroupCollector, critic: CriticGroup | None = None, kl_ctl=None) -> None:
    ckpt = run_dir.checkpoint_dir(step)
    state = {"step": step, "weight_version": version, "collector": collector.state_dict()}
    if kl_ctl is not None:
        state["kl_coef"] = kl_ctl.value
    learner.save_checkpoint(str(ckpt), state)
    if critic is not None:
        critic.save_checkpoint(str(ckpt / "critic"))
    (ckpt / "COMPLETE").write_text(f"step {step}\n")  # resume trusts only finished checkpoints


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
