"""The environment interface: what a user's ``rollout.environment`` class implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# An observation is a string (one user message) or a list of chat messages ({"role", "content"}).
Observation = str | list[dict[str, Any]]


@dataclass
class StepResult:
    """What the environment answers to one policy turn.

    ``observation``: the next messages for the policy (None when ``done``); ``reward``: an
    optional reward of this turn (summed into the episode's reward); ``done``: the episode is over.
    """

    observation: Observation | None = None
    reward: float | None = None
    done: bool = False


class Environment:
    """One episode's environment. fleetrl builds one instance per episode (``cls(**env_kwargs)``).

    Both methods may be ``async def`` (preferred: a slow tool then blocks nothing) or plain
    ``def`` (run in a thread so the other episodes keep going). Each call is bounded by
    ``rollout.episode.step_timeout_s``.
    """

    async def reset(self, row: dict[str, Any]) -> Observation | None:
        """Start an episode from a data row (its columns, ``prompt`` included). Return the first
        observation, or None to start from the row's own prompt (rendered by the chat template)."""
        return None

    async def step(self, text: str) -> StepResult:
        """Take the policy's turn (its text, decoded from the sampled tokens) and answer it."""
        raise NotImplementedError("an Environment must implement step(text) -> StepResult")

    def preflight(self) -> str | None:
        """Check what the environment needs on this machine (a sandbox, a service), before any episode:
        ``fleetrl check`` calls it in the driver and every rollout worker before its first episode.
        Raise with a message saying what to change; return a one-line note (or None)."""
        return None
