"""Service start-up of an online run: the rollout fleet, the policy learner, the reward actors,
the run's control actor and (algorithms with a critic) the critic; ``Services.shutdown`` frees them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from fleetrl.core.nodes import placement, placement_line
from fleetrl.env import resolve_environment
from fleetrl.learner.critic import CriticGroup
from fleetrl.learner.group import LearnerGroup
from fleetrl.online.control import start_control_actor
from fleetrl.reward.actor import make_reward_actors
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import ConfigError, RunConfig
from fleetrl.run.runtime import RunDir, load_tokenizer, resolve_model

log = logging.getLogger("fleetrl")


@dataclass
class Services:
    """The Ray actors of one online run; ``shutdown`` frees them (and their names) on any exit."""

    fleet: RolloutFleet
    reward_actors: list
    learner: LearnerGroup
    control: Any = None  # the run's named RunControl actor (fleetrl scale talks to it)
    critic: CriticGroup | None = None  # algorithms with a critic (ppo)
    teacher: Any = None  # opd's frozen teacher (learner/teacher.py TeacherGroup)
    # Seconds from start_services to each service being ready, and the engines' own start/warm-up.
    startup: dict[str, float] = field(default_factory=dict)
    # Actor name -> "IP [node id]" where it runs (core.nodes.placement), printed at start.
    placement: dict[str, str] = field(default_factory=dict)

    def shutdown(self) -> None:
        critic = self.critic.shutdown if self.critic is not None else (lambda: None)
        teacher = self.teacher.shutdown if self.teacher is not None else (lambda: None)
        for stop in (self.fleet.shutdown, critic, teacher, self.learner.shutdown,
                     lambda: [ray.kill(a) for a in self.reward_actors + [self.control] if a is not None]):
            try:
                stop()
            except Exception as e:  # keep freeing the others; the run's own error matters more
                log.warning("while shutting down: %s", e)


def start_services(cfg: RunConfig, run_dir: RunDir, model_path: str, backend: str,
                   critic_path: str | None = None) -> Services:
    """The fleet, the policy learner, the reward actors and (algorithms with a critic, from `critic_path`)
    the critic."""
    with_critic = cfg.online_algorithm.critic
    critic_note = f", {cfg.critic.learner_config(cfg.learner).num_ranks} critic rank(s) " \
                  f"({cfg.critic.placement}) from {critic_path}" if with_critic else ""
    # online_dpo's pair-loss reference: online_dpo.reference_model_path, else (null) the starting policy.
    given = cfg.online_dpo.reference_model_path if cfg.pairs_per_step else None
    reference_path = local_path(resolve_model(given)) if given else None
    reference_note = f", reference {reference_path}" if reference_path else ""
    print(f"fleetrl: starting {cfg.rollout.num_workers} rollout worker(s), {cfg.reward.num_workers} reward "  # noqa: T201
          f"worker(s), {cfg.learner.num_ranks} learner rank(s) [{backend}] on {model_path}{critic_note}"
          f"{reference_note}", flush=True)
    t0 = time.perf_counter()
    age = process_age_s()
    prefix = run_dir.actor_prefix
    total_steps = cfg.run.steps * cfg.optimizer_steps_per_step
    colocate = with_critic and cfg.critic.placement == "colocate"
    started: list[Any] = []

    def stop_started() -> None:
        for service in reversed(started):
            service.shutdown()

    if cfg.rollout.environment is not None:
        # Checked here, once (a bad path or env_kwargs fails before any actor starts); the workers
        # get an absolute path.
        cfg.rollout.environment = resolve_environment(cfg.rollout.environment, run_dir.config_dir,
                                                      cfg.rollout.episode.env_kwargs)
    # Actor creation is asynchronous: the services start side by side.
    fleet = RolloutFleet(cfg.rollout, model_path, name_prefix=prefix,
                         lora_rank=cfg.learner.lora.r if cfg.learner.lora is not None else None)
    started.append(fleet)
    try:
        # online_dpo's ranks train its pair loss (learner/offline.py PairObjective) on chosen/rejected pairs.
        pair_loss = cfg.online_dpo.loss if cfg.pairs_per_step else None
        pair_kwargs = {"objective": pair_loss, "objective_cfg": getattr(cfg, pair_loss),
                       "reference_path": reference_path} if pair_loss else None
        learner = LearnerGroup(cfg.learner, model_path, total_steps=total_steps,
                               mini_batch_size=cfg.mini_batch_size, name_prefix=prefix, wait=False,
                               learner_kwargs=pair_kwargs,
                               reserve=CriticGroup.reserve(cfg.critic, cfg.learner) if colocate else None)
        started.append(learner)
        critic = None
        if with_critic:
            critic = CriticGroup(cfg.critic, cfg.learner, critic_path, total_steps=total_steps,
                                 mini_batch_size=cfg.mini_batch_size, name_prefix=prefix,
                                 colocate_with=learner if colocate else None, wait=False)
            started.append(critic)
        teacher = None
        if cfg.teacher is not None:
            from fleetrl.learner.teacher import TeacherGroup

            teacher = TeacherGroup(cfg.teacher, local_path(resolve_model(cfg.teacher.model_path)),
                                   name_prefix=prefix, wait=False)
            started.append(teacher)
        # With an environment and no reward functions, the environment's turn rewards are the reward.
        reward_actors = make_reward_actors(cfg.reward, base_dir=str(run_dir.config_dir), name_prefix=prefix) \
            if cfg.reward.functions else []
    except BaseException:
        stop_started()
        raise
    services = Services(fleet, reward_actors, learner, start_control_actor(prefix, cfg.rollout.num_workers),
                        critic=critic, teacher=teacher)
    waits: dict[str, Callable[[], Any]] = {"learner": learner.wait_ready, "fleet": fleet.wait_ready}
    if teacher is not None:
        waits["teacher"] = teacher.wait_ready
    if critic is not None:
        waits["critic"] = critic.wait_ready
    try:
        ready = wait_side_by_side(waits, t0)
    except BaseException:
        services.shutdown()
        raise
    services.startup = {f"startup/{name}_ready": s for name, (s, _) in ready.items()}
    infos = ready["fleet"][1]
    actors = {f"rollout-{i.get('worker_index', n)}": i for n, i in enumerate(infos)}
    for group in (learner, critic):
        if group is not None:
            actors.update({f"{group.role}-rank-{i.get('rank', n)}": i for n, i in enumerate(group.rank_info)})
    services.placement = placement(actors)
    print(f"fleetrl: placement: {placement_line(actors)}", flush=True)  # noqa: T201
    services.startup["startup/engine_start"] = max(i.get("engine_start_s", 0.0) for i in infos)
    services.startup["startup/engine_warmup"] = max(i.get("warmup_s", 0.0) for i in infos)
    services.startup["startup/services"] = time.perf_counter() - t0
    if age is not None:  # imports, Ray connection, tokenizer and data, before any service
        services.startup["startup/before_services"] = age
    return services


def wait_side_by_side(waits: dict[str, Callable[[], Any]], t0: float) -> dict[str, tuple[float, Any]]:
    """Run every service's readiness wait at once (each has its own deadline); print each as it is
    ready. {name: (seconds since t0, what its wait returned)}; the first failure is raised."""
    out: dict[str, tuple[float, Any]] = {}
    def timed(wait: Callable[[], Any]) -> tuple[float, Any]:
        result = wait()
        return time.perf_counter() - t0, result  # stamped in the thread: exact even if read late

    with ThreadPoolExecutor(max_workers=len(waits), thread_name_prefix="fleetrl-ready") as pool:
        futures = {pool.submit(timed, wait): name for name, wait in waits.items()}
        for fut in as_completed(futures):
            name = futures[fut]
            out[name] = fut.result()  # a failed service: raised now, the caller shuts all down
            pending = sorted(set(waits) - set(out))
            print(f"fleetrl: {name} ready after {out[name][0]:.1f}s"  # noqa: T201
                  + (f" (waiting for {', '.join(pending)})" if pending else ""), flush=True)
    return out


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc: what `fleetrl train` waited in all); None elsewhere."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def local_path(path: str) -> str:
    """An existing local path made absolute (actors run in other working directories); else unchanged."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def check_critic_tokenizer(cfg: RunConfig, critic_path: str, policy_path: str, tokenizer) -> None:
    """A critic started from a reward model reads the policy's token ids: the vocabularies must agree."""
    if critic_path == policy_path:
        return
    theirs = load_tokenizer(critic_path)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the critic starts from {critic_path} (critic.init: {cfg.critic.init}), whose tokenizer "
            f"differs from the policy's ({policy_path}); the critic reads the policy's token ids. Use "
            "critic.init: policy or point critic.model_path at a model with the policy's tokenizer"
        )
