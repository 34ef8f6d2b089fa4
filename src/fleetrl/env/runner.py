"""Run one episode: the policy generates a turn, the environment answers, until a limit or done.

``generate`` is the rollout worker's (one engine request per turn); every episode is its own
coroutine, so while one waits on a slow environment the others keep generating.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fleetrl.env.base import StepResult
from fleetrl.env.config import EpisodeConfig
from fleetrl.env.episode import ChatDelta, Episode, as_messages


class EnvError(RuntimeError):
    """An environment raised or missed its deadline (rollout.episode.on_error: fail)."""


@dataclass
class TurnOutput:
    """One policy turn as sampled: token ids, their sampling log-probs, the finish reason and the
    weight versions of its first and last token."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    weight_version: int = 0
    last_weight_version: int = 0


# (prompt ids so far, max new tokens) -> the turn
GenerateFn = Callable[[list[int], int], Awaitable[TurnOutput]]


@dataclass
class EpisodeResult:
    episode: Episode
    finish_reason: str | None  # of the last policy turn, or "env_error" / "max_total_tokens"
    weight_version: int  # oldest weights of any turn
    last_weight_version: int
    env_s: float = 0.0  # time inside reset/step
    error: str | None = None  # the environment error that ended it (on_error: zero)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def turn_reward(self) -> float:
        return sum(r for r in self.episode.turn_rewards if r is not None)


async def _call(fn, *args, timeout_s: float):
    """Await an async method, or run a plain one in a thread; either way within ``timeout_s``.
    (A plain method past its deadline keeps its thread: Python cannot kill it.)"""
    if inspect.iscoroutinefunction(fn):
        return await asyncio.wait_for(fn(*args), timeout_s)
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout_s)


async def run_episode(env, row: dict[str, Any], prompt_ids: list[int], generate: GenerateFn, delta: ChatDelta,
                      cfg: EpisodeConfig, max_tokens: int, name: str = "episode") -> EpisodeResult:
    """One episode of ``env`` from data ``row``. ``prompt_ids``: the row's rendered prompt, used
    when ``reset`` returns None. ``max_tokens``: per turn (rollout.sampling.max_tokens). ``name``
    says which episode it is in error messages."""
    env_s = 0.0
    stage = "reset"
    ep: Episode | None = None
    versions: list[tuple[int, int]] = []
    finish: str | None = None

    async def env_call(fn, *args):
        nonlocal env_s
        t0 = time.perf_counter()
        try:
            return await _call(fn, *args, timeout_s=cfg.step_timeout_s)
        finally:
            env_s += time.perf_counter() - t0

    try:
        first = await env_call(env.reset, row)
        ep = Episode(prompt_ids=list(prompt_ids) if first is None else delta.first(first, getattr(env, "tools", None)))
        ep.messages = as_messages(first) if first is not None else [{"role": "user", "content": row.get("prompt")}]
        while ep.num_turns < cfg.max_turns:
            room = cfg.max_total_tokens - len(ep.ids)
            if room <= 0:
                finish = "max_total_tokens"
                break
            turn = await generate(ep.ids, min(max_tokens, room))
            versions.append((turn.weight_version, turn.last_weight_version))
            finish = turn.finish_reason
            text = delta.tokenizer.decode(turn.token_ids, skip_special_tokens=True)
            ep.add_turn(list(turn.token_ids), list(turn.logprobs), text)
            stage = f"step of turn {ep.num_turns}"
            result = await env_call(env.step, text)
            if not isinstance(result, StepResult):
                raise TypeError(f"step must return a fleetrl.env.StepResult, got {type(result).__name__}")
            reward = None if result.reward is None else float(result.reward)
            if reward is not None and not math.isfinite(reward):
                # A NaN would spread into the group's advantages and every weight of the update.
                raise ValueError(f"step returned a non-finite reward ({reward}); return a finite number or None")
            ep.turn_rewards.append(reward)
            if result.done or result.observation is None or ep.num_turns >= cfg.max_turns:
                break
            obs_ids = delta.observation_ids(result.observation, turn.token_ids)
            if len(ep.ids) + len(obs_ids) >= cfg.max_total_tokens:
                finish = "max_total_tokens"  # no room for another turn after this observation
                break
            ep.add_observation(obs_ids, result.observation)
    except Exception as e:
        what = f"timed out after {cfg.step_timeout_s:g} s (rollout.episode.step_timeout_s)" \
            if isinstance(e, TimeoutError) else f"raised {type(e).__name__}: {e}"
        message = f"environment {type(env).__name__} in {name}, {stage}: {what}"
        if cfg.on_error == "fail":
            raise EnvError(message + " (rollout.episode.on_error: zero scores such episodes 0 instead)") from e
        if ep is None:  # reset failed: an episode with no policy tokens (nothing to train)
            ep = Episode(prompt_ids=list(prompt_ids))
        return EpisodeResult(ep, "env_error", *_versions(versions), env_s=env_s, error=message)
    return EpisodeResult(ep, finish, *_versions(versions), env_s=env_s)


def _versions(versions: list[tuple[int, int]]) -> tuple[int, int]:
    if not versions:
        return 0, 0
    return min(v for v, _ in versions), max(v for _, v in versions)
