"""An episode as token ids: exactly what the fleet sampled, plus observation tokens built once.

Nothing is ever re-rendered from text: a chat template may render an earlier assistant turn
differently from how it was sampled (trimmed spaces, stripped reasoning, other tokenization), and
training on such a re-rendering trains tokens the policy never produced. Observation tokens come
from rendering only the *delta* a new message adds after a fixed probe conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetrl.env.base import Observation

_PROBE = [{"role": "user", "content": "\x00u"}, {"role": "assistant", "content": "\x00a"}]


def as_messages(obs: Observation) -> list[dict[str, Any]]:
    if isinstance(obs, str):
        return [{"role": "user", "content": obs}]
    if isinstance(obs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in obs):
        return obs
    raise TypeError(f"an observation must be a string or a list of {{'role', 'content'}} messages, got {obs!r:.200}")


class ChatDelta:
    """Tokens of what follows a finished policy turn: the template's end of that turn, the new
    messages, and the next generation prompt. Computed from a probe conversation, once per call,
    never from the episode's own history."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._base = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        end = self._base.rfind("\x00a")
        if end < 0:
            raise ValueError("the chat template drops assistant messages; multi-turn episodes need them rendered")
        # What the template writes after an assistant turn's content (e.g. "<|im_end|>\n").
        self.turn_close = self._base[end + 2:]

    def check_tools(self, tools: list[dict]) -> None:
        """Raises ValueError when the chat template does not show ``tools`` (an environment's tool
        schemas) to the model: the policy would be asked to call tools it never sees."""
        probe = [{"role": "user", "content": "\x00q"}]
        plain = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        shown = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, tools=tools)
        names = [t.get("function", t).get("name", "?") for t in tools]
        missing = [n for n in names if n not in shown or shown == plain]
        if missing:
            raise ValueError(
                f"the chat template of {self.tokenizer.name_or_path or 'the tokenizer'} does not render `tools`, "
                f"so the policy would never see the environment's tools {missing}; use a model (or model.tokenizer) "
                "whose template renders tools (e.g. Qwen2.5-Instruct), or an environment without tools")

    def first(self, obs: Observation, tools: list[dict] | None = None) -> list[int]:
        """The episode's first tokens: the observation with the generation prompt (and the
        environment's tool schemas, which templates render once, at the start)."""
        text = self.tokenizer.apply_chat_template(as_messages(obs), tokenize=False, add_generation_prompt=True,
                                                  **({"tools": tools} if tools else {}))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def observation_ids(self, obs: Observation, turn_ids: list[int]) -> list[int]:
        """Token ids to append after the policy turn ``turn_ids`` (as sampled) for observation ``obs``."""
        full = self.tokenizer.apply_chat_template(_PROBE + as_messages(obs), tokenize=False,
                                                  add_generation_prompt=True)
        if not full.startswith(self._base):
            raise ValueError("the chat template renders earlier messages differently once a message is "
                             "appended, so observation tokens cannot be built as a delta; use a template "
                             "whose rendering of a conversation is a prefix of the longer one")
        close = self.turn_close
        # The sampled turn usually ends with the stop token that opens the template's closing text.
        tail = self.tokenizer.decode(turn_ids[-1:], skip_special_tokens=False) if turn_ids else ""
        if tail and close.startswith(tail):
            close = close[len(tail):]
        return self.tokenizer(close + full[len(self._base):], add_special_tokens=False)["input_ids"]


@dataclass
class Episode:
    """Prompt ids, then policy turns and observations in order. ``completion_ids`` is everything
    after the prompt; ``loss_mask`` is 1 on policy tokens, 0 on observation tokens; ``logprobs``
    are the sampler's on policy tokens and 0 on observation tokens."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    turn_rewards: list[float | None] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def add_turn(self, ids: list[int], logprobs: list[float], text: str) -> None:
        if len(ids) != len(logprobs):
            raise ValueError(f"a policy turn of {len(ids)} tokens came with {len(logprobs)} logprobs")
        self.completion_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.turn_texts.append(text)
        self.messages.append({"role": "assistant", "content": text})

    def add_observation(self, ids: list[int], obs: Observation) -> None:
        self.completion_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.messages += as_messages(obs)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def num_turns(self) -> int:
        return len(self.turn_texts)

    @property
    def observation_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)
