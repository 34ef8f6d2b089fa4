"""What exact resume and recovery add to an online run: the state a checkpoint must hold beyond the
learner's weights and the collector (RNG states, the reward service's running statistics, the fleet
size asked for with ``fleetrl scale``), and the recovery counters of the metrics rows."""

from __future__ import annotations

import random
from typing import Any

import torch

# Reading the reward actors' statistics and the control actor's target waits at most this long.
STATE_TIMEOUT_S = 300.0


def exact_resume_state(services, timeout_s: float = STATE_TIMEOUT_S) -> dict[str, Any]:
    """Client state for a checkpoint: driver RNG states, each reward actor's state (a reward model's
    normaliser), the wanted fleet size."""
    import ray

    refs = [a.state_dict.remote() for a in services.reward_actors]
    if services.control is not None:
        refs.append(services.control.target_rollout_workers.remote())
    try:
        got = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise TimeoutError(
            f"saving a checkpoint: the reward actors or the run's control actor did not hand over their state "
            f"within {timeout_s:.0f}s; check them on the Ray dashboard (<run>/reward-<i>, <run>/orchestrator)"
        ) from e
    state: dict[str, Any] = {"rng": rng_state(), "reward_state": got[: len(services.reward_actors)]}
    if services.control is not None:
        state["fleet_size"] = int(got[-1])
    return state


def restore_exact_state(services, state: dict[str, Any], timeout_s: float = STATE_TIMEOUT_S) -> None:
    """The inverse of exact_resume_state (keys missing from older checkpoints are left alone)."""
    import ray

    if "rng" in state:
        set_rng_state(state["rng"])
    refs = [a.load_state_dict.remote(s) for a, s in zip(services.reward_actors, state.get("reward_state", [])) if s]
    if services.control is not None and state.get("fleet_size"):
        # The loop's first step resizes the fleet to it (a `fleetrl scale` survives the resume).
        refs.append(services.control.request_rollout_workers.remote(int(state["fleet_size"])))
    ray.get(refs, timeout=timeout_s)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))


def recovery_metrics(collector, restarts: int) -> dict[str, float]:
    """Counters for the whole run so far (this service start): faults absorbed and restarts."""
    return {"run/restarts": restarts, "reward/restarts": collector.reward_restarts,
            "reward/rescored_groups": collector.rescored_groups}
