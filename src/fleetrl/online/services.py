"""Service start-up of an online run: the rollout fleet, the policy learner, the reward actors,
the run's control actor and (algorithms with a critic) the critic; ``Services.shutdown`` frees them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fleetrl.learner.critic import CriticGroup
from fleetrl.learner.group import LearnerGroup
from fleetrl.online.control import start_control_actor
from fleetrl.reward.actor import make_reward_actors
from fleetrl.rollout.fleet import RolloutFleet
from fleetrl.run.config import ConfigError, RunConfig
from fleetrl.run.runtime import RunDir, load_tokenizer

log = logging.getLogger("fleetrl")


@dataclass
class Services:
    """The Ray actors of one online run; ``shutdown`` frees them (and their names) on any exit."""

    fleet: RolloutFleet
    reward_actors: list
    learner: LearnerGroup
    control: Any = None  # the run's named RunControl actor (fleetrl scale talks to it)
    critic: CriticGroup | None = None  # algorithms with a critic (ppo)

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
    """The fleet, the policy learner, the reward actors and (algorithms with a critic, from `critic_path`)
    the critic."""
    with_critic = cfg.online_algorithm.critic
    critic_note = f", {cfg.critic.learner_config(cfg.learner).num_ranks} critic rank(s) " \
                  f"({cfg.critic.placement}) from {critic_path}" if with_critic else ""
    print(f"fleetrl: starting {cfg.rollout.num_workers} rollout worker(s), {cfg.reward.num_workers} reward "  # noqa: T201
          f"worker(s), {cfg.learner.num_ranks} learner rank(s) [{backend}] on {model_path}{critic_note}",
          flush=True)
    t0 = time.perf_counter()
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
        _ready(f"learner ({cfg.learner.num_ranks} rank(s))", t0)
        if critic is not None:
            critic.wait_ready()
            _ready("critic", t0)
        fleet.wait_ready()
        _ready(f"rollout fleet ({cfg.rollout.num_workers} vLLM engine(s))", t0)
    except BaseException:
        services.shutdown()
        raise
    return services


def _ready(what: str, t0: float) -> None:
    # Start-up takes minutes on a cluster (placement, model loading, engine warm-up): say what is up.
    print(f"fleetrl: {what} ready, {time.perf_counter() - t0:.1f}s after start", flush=True)  # noqa: T201


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
