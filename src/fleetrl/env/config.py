"""Limits and error policy of multi-turn episodes (``rollout.episode``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fleetrl.core.strict import StrictModel


class EpisodeConfig(StrictModel):
    """Used when ``rollout.environment`` is set; every episode stops at the first limit it meets."""

    max_turns: int = Field(8, ge=1)  # policy turns per episode
    # Prompt + every policy and observation token; keep it <= rollout.max_model_len.
    max_total_tokens: int = Field(4096, ge=2)
    # Deadline of each reset/step call of the environment; a late call is an environment error.
    step_timeout_s: float = Field(60.0, gt=0)
    # fail: an environment that raises or times out ends the run (the message names the episode);
    # zero: that episode ends, scores 0 and is counted in env/errors.
    on_error: Literal["fail", "zero"] = "fail"
    # Keyword arguments for the environment class (one instance per episode).
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
