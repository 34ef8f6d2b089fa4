"""Groups of samples -> padded training tensors. Pure functions, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sample:
    """One completion of one prompt, as the fleet returned it, plus its reward once scored."""

    prompt_index: int  # position in the prompt stream (unique per prompt this run)
    prompt_text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler's logprob of each completion token
    finish_reason: str
    weight_version: int  # the weights its first token was sampled with (or older: see RolloutWorker)
    completion_text: str = ""
    worker_index: int = -1  # which rollout worker sampled it
    reward: float | None = None
    reward_parts: dict[str, float] = field(default_factory=dict)
    # The weights its last token was sampled with; newer than weight_version when a weight update
    # reached the engine mid-generation (rollout.weight_update: in_flight). None = weight_version.
    last_weight_version: int | None = None
    # Multi-turn episodes (rollout.environment): 1 on each completion token the policy sampled, 0
    # on observation tokens the environment wrote (their logprobs are 0). None = all policy tokens.
    completion_mask: list[int] | None = None
    episode: dict[str, Any] | None = None  # turns, observation_tokens, env_s, env_error, turn_rewards

    @property
    def updated_in_flight(self) -> bool:
        return self.last_weight_version is not None and self.last_weight_version != self.weight_version


@dataclass
class Group:
    """All samples of one prompt; GRPO compares them with each other."""

    prompt_index: int
    row: Any  # the data row (its extra columns go to reward functions)
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]  # type: ignore[misc]

    @property
    def min_version(self) -> int:
        """The oldest weights any of its tokens came from: what the staleness bound judges."""
        return min(s.weight_version for s in self.samples)

    @property
    def is_scored(self) -> bool:
        return all(s.reward is not None for s in self.samples)


def pad_samples(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion tensors aligned for the learner.

    ``input_ids[b, t]`` is token t; ``loss_mask`` is 1 where t is a completion token the policy
    sampled; ``old_logprobs[b, t]`` is the sampler's logprob of token t (0 elsewhere). When a sample
    is a multi-turn episode, ``observation_mask`` is 1 on its observation tokens (0 in the loss
    mask; per-token advantages pass over them).
    """
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    T = max(lengths)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    old_logprobs = torch.zeros((B, T), dtype=torch.float32)
    episodes = any(s.completion_mask is not None for s in samples)
    observation_mask = torch.zeros((B, T), dtype=torch.float32)
    for b, s in enumerate(samples):
        if len(s.logprobs) != len(s.completion_ids):
            raise ValueError(
                f"sample of prompt {s.prompt_index}: {len(s.completion_ids)} tokens but "
                f"{len(s.logprobs)} logprobs from the sampler"
            )
        p, c = len(s.prompt_ids), len(s.completion_ids)
        input_ids[b, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
        attention_mask[b, : p + c] = 1
        old_logprobs[b, p : p + c] = torch.tensor(s.logprobs, dtype=torch.float32)
        if s.completion_mask is None:
            loss_mask[b, p : p + c] = 1.0
            continue
        if len(s.completion_mask) != c:
            raise ValueError(f"episode of prompt {s.prompt_index}: {c} tokens but a completion mask of "
                             f"{len(s.completion_mask)}")
        policy = torch.tensor(s.completion_mask, dtype=torch.float32)
        loss_mask[b, p : p + c] = policy
        observation_mask[b, p : p + c] = 1.0 - policy
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "old_logprobs": old_logprobs,
    }
    if episodes:
        out["observation_mask"] = observation_mask
    return out


def completion_stats(samples: list[Sample]) -> dict[str, float]:
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    truncated = sum(s.finish_reason == "length" for s in samples)
    return {
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/clip_ratio": truncated / len(samples),
    }


def episode_stats(samples: list[Sample]) -> dict[str, float]:
    """Multi-turn metrics (empty for single-turn samples): turns per episode, the share of
    completion tokens the environment wrote, environment time and errors, reward of each turn."""
    eps = [s.episode for s in samples if s.episode is not None]
    if not eps:
        return {}
    completion = sum(len(s.completion_ids) for s in samples if s.episode is not None)
    out = {
        "episode/turns": sum(e["turns"] for e in eps) / len(eps),
        "episode/observation_token_share": sum(e["observation_tokens"] for e in eps) / max(completion, 1),
        "env/time_s": sum(e["env_s"] for e in eps),
        "env/errors": sum(e["env_error"] is not None for e in eps),
    }
    most = max(len(e["turn_rewards"]) for e in eps)
    for k in range(most):
        got = [e["turn_rewards"][k] for e in eps if len(e["turn_rewards"]) > k and e["turn_rewards"][k] is not None]
        if got:
            out[f"reward/turn_{k + 1}"] = sum(got) / len(got)
    return out
