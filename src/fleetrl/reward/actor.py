"""Ray actors of the reward service: each is a RewardScorer in its own process.

    actors = make_reward_actors(cfg.reward, base_dir=config_dir)        # reward-0, reward-1, ...
    result = ray.get(actors[0].score.remote(prompts, completions, {"answer": answers}),
                     timeout=cfg.reward.call_deadline_s())

Actors are created in the caller's Ray namespace (none is forced); `name_prefix` keeps the names of
two runs in one namespace apart. A RewardError raised while scoring reaches the caller of `ray.get`
as an exception that is also a RewardError, with the original message.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from fleetrl.core.waits import wait_all
from fleetrl.reward.config import RewardConfig
from fleetrl.reward.scorer import RewardScorer

# The actor class is the plain scorer: all behaviour is tested without Ray.
RewardActor = ray.remote(RewardScorer)
NAME_FREE_TIMEOUT_S = 30.0


def reward_actor_name(index: int, name_prefix: str = "") -> str:
    return f"{name_prefix}reward-{index}"


def make_reward_actors(
    cfg: RewardConfig | dict,
    base_dir: str | Path | None = None,
    name_prefix: str = "",
    wait: bool = True,
) -> list:
    """Start cfg.num_workers named reward actors; with `wait`, return once every one has loaded.

    Relative rule paths are resolved against `base_dir` (default: the current directory), made
    absolute here because actors run in another working directory. If an actor fails to start
    (a rule file missing, a reward model that does not load), all are killed and the error raised.
    """
    cfg = cfg if isinstance(cfg, RewardConfig) else RewardConfig.model_validate(cfg)
    base = str(Path(base_dir if base_dir is not None else Path.cwd()).resolve())
    actors = []
    try:
        for i in range(cfg.num_workers):
            actors.append(_start(cfg, base, reward_actor_name(i, name_prefix)))
        if wait:
            wait_ready(cfg, actors, [reward_actor_name(i, name_prefix) for i in range(len(actors))])
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


def restart_reward_actor(cfg: RewardConfig, index: int, base_dir: str | Path | None = None,
                         name_prefix: str = "", dead=None):
    """A new reward actor ``index`` in place of a dead one (``dead``: its handle, killed first so
    its name is free); returns once it has loaded."""
    if dead is not None:
        ray.kill(dead, no_restart=True)
    base = str(Path(base_dir if base_dir is not None else Path.cwd()).resolve())
    deadline = time.monotonic() + NAME_FREE_TIMEOUT_S
    while True:  # the dead actor's name is freed asynchronously
        try:
            actor = _start(cfg, base, reward_actor_name(index, name_prefix))
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        wait_ready(cfg, [actor], [reward_actor_name(index, name_prefix)])
    except BaseException:
        ray.kill(actor)
        raise
    return actor


def wait_ready(cfg: RewardConfig, actors: list, names: list[str]) -> list:
    """Every actor's describe() once it has loaded, within reward.ready_timeout_s; a TimeoutError
    names the actors that did not answer, what each asks for and what the cluster has free."""
    ask = {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus, **cfg.resources}
    return wait_all(
        [a.describe.remote() for a in actors], [f"reward actor {n!r}" for n in names], cfg.ready_timeout_s,
        "starting the reward service (reward.ready_timeout_s)",
        lambda: f"Each asks for {ask}; the cluster has {ray.cluster_resources()} in all, {ray.available_resources()} "
        "free. If they could not be placed: lower reward.num_workers or the per-actor resources, or add "
        "nodes; if a reward model loads slowly: raise reward.ready_timeout_s")


def _start(cfg: RewardConfig, base: str, name: str):
    try:
        options = RewardActor.options(name=name, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                      resources=dict(cfg.resources) or None)
        return options.remote(cfg, base)
    except ValueError as e:
        raise ValueError(
            f"cannot create reward actor {name!r}: {e}. Another run in this Ray namespace uses the "
            "name: stop it, or pass a different name_prefix"
        ) from e
