"""Configuration of the reward service: which functions score a sample, their weights, and the actors.

A run's reward is the weighted sum of one or more functions, each of one kind:

```yaml
reward:
  on_error: fail            # or "zero": score failing samples 0 and count them in the metrics
  timeout_s: 60             # deadline of each call of a function; a late call fails like a raising one
  num_workers: 2            # reward actors reward-0, reward-1
  functions:
    - {name: correct, kind: builtin, builtin: numeric_answer, weight: 1.0}
    - {name: format, kind: rule, path: rewards.py:has_answer_line, weight: 0.2, timeout_s: 5}
    - {name: rm, kind: model, model_path: /models/my-rm, normalize: true}
    - {name: judge, kind: http, url: "http://judge:8000/score", timeout_s: 10}
```

Each kind has its own model (`kind` picks it), so a field of another kind is an error, not ignored.
`timeout_s` on a rule, builtin or model function overrides `reward.timeout_s` for that function; on an
http function it is the deadline of one try (connect, send and read the whole answer).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fleetrl.core.strict import StrictModel

MAX_TIMEOUT_S = 24 * 3600.0
HTTP_DEADLINE_MARGIN_S = 5.0  # over an http function's own worst case, for DNS and JSON decoding
CALL_MARGIN_S = 30.0  # over a score() call's worst case, for Ray's transport


def http_worst_case_s(timeout_s: float, max_retries: int, retry_backoff_s: float) -> float:
    """The longest one http call can take: every try to its deadline plus the backoff between tries."""
    backoff = sum(retry_backoff_s * 2**k for k in range(max_retries))
    return (max_retries + 1) * timeout_s + backoff


def _check_timeout(v: float | None) -> float | None:
    if v is not None and not (math.isfinite(v) and 0 < v <= MAX_TIMEOUT_S):
        raise ValueError(
            f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g} (a day), got {v}; "
            "every call needs a deadline"
        )
    return v


class _FunctionBase(StrictModel):
    name: str = Field(min_length=1, description="Name used in metrics and error messages; unique per run.")
    weight: float = Field(default=1.0, description="Multiplier of this function's score in the summed reward.")

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("weight must be a finite number")
        return v


class _LocalFunctionBase(_FunctionBase):
    timeout_s: float | None = Field(
        default=None,
        description="Deadline of one call of this function in seconds; unset means reward.timeout_s.",
    )

    @field_validator("timeout_s")
    @classmethod
    def _timeout_in_range(cls, v: float | None) -> float | None:
        return _check_timeout(v)


class RuleFunctionConfig(_LocalFunctionBase):
    """User Python: `path/to/file.py:function`, relative to the config file's directory (or the CWD)."""

    kind: Literal["rule"]
    path: str = Field(description="'path/to/file.py:function_name'")

    @field_validator("path")
    @classmethod
    def _file_colon_function(cls, v: str) -> str:
        file_part, sep, fn_part = v.rpartition(":")
        if not sep or not file_part or not fn_part.isidentifier():
            raise ValueError(
                f"expected 'path/to/file.py:function_name', got {v!r}: write the Python file, a colon, "
                "and the name of the function defined in it"
            )
        if not file_part.endswith(".py"):
            raise ValueError(f"the file in {v!r} must be a .py file")
        return v


class BuiltinFunctionConfig(_LocalFunctionBase):
    """One of the functions shipped in `fleetrl.reward.builtins`; `kwargs` are its options."""

    kind: Literal["builtin"]
    builtin: Literal["exact_match", "numeric_answer", "math_answer", "format_regex", "letter_fraction"]
    kwargs: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("kwargs")
    @classmethod
    def _kwargs_fit_builtin(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Build the function once now so that a wrong option fails at config time, naming the option.
        from fleetrl.reward.builtins import make_builtin

        if "builtin" in info.data:  # else the builtin name itself was invalid and is reported
            make_builtin(info.data["builtin"], v)
        return v


class ModelFunctionConfig(_LocalFunctionBase):
    """A Hugging Face sequence-classification reward model with one output (num_labels=1)."""

    kind: Literal["model"]
    model_path: str = Field(min_length=1, description="Local directory (or hub id) of the reward model.")
    max_length: int = Field(default=1024, gt=0, description="Tokens per prompt+completion; longer is cut.")
    truncation_side: Literal["left", "right"] = Field(
        default="left",
        description="Which end to cut when too long. 'left' keeps the end of the completion, which the "
        "model's last-token score reads.",
    )
    batch_size: int = Field(default=16, gt=0)
    normalize: bool = Field(
        default=False, description="Standardize scores with a running mean/std over all scores seen."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class HttpFunctionConfig(_FunctionBase):
    """A remote scorer: POST {"prompts", "completions", "columns"} and get back {"rewards": [...]}."""

    kind: Literal["http"]
    url: str
    timeout_s: float = Field(
        default=30.0,
        description="Deadline of one try in seconds: connect, send and read the whole answer. A call makes "
        "up to max_retries + 1 tries with backoff between them.",
    )
    max_response_bytes: int = Field(
        default=4 * 1024 * 1024, gt=0, description="Largest answer body accepted; a bigger one is an error."
    )
    max_retries: int = Field(default=2, ge=0, description="Retries after the first try, on timeouts, "
                             "connection errors, 429 and 5xx.")
    retry_backoff_s: float = Field(default=1.0, ge=0, description="Sleep before retry k is backoff * 2**k.")
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("timeout_s")
    @classmethod
    def _timeout_in_range(cls, v: float | None) -> float | None:
        return _check_timeout(v)

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"url must start with http:// or https:// and name a host, got {v!r}")
        return v


RewardFunctionConfig = Annotated[
    RuleFunctionConfig | BuiltinFunctionConfig | ModelFunctionConfig | HttpFunctionConfig,
    Field(discriminator="kind"),
]


class RewardConfig(StrictModel):
    """The reward service: functions summed with weights, error policy, and the Ray actors running them."""

    # Empty is valid here (offline algorithms score nothing); the scorer refuses to start without one.
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    on_error: Literal["fail", "zero"] = Field(
        default="fail",
        description="'fail' stops the run at the first failing sample with the function, sample and "
        "exception in the message. 'zero' scores failing samples 0 for that function and reports them "
        "(the orchestrator counts them in the metrics) - for long runs with a flaky scorer.",
    )
    timeout_s: float = Field(
        default=60.0,
        description="Deadline in seconds of each call of a rule, builtin or model function (functions[i]."
        "timeout_s overrides it). A late call is handled by on_error like one that raised; it keeps running "
        "in a background thread, and a function with several such calls still running is refused as broken.",
    )
    num_workers: int = Field(default=1, ge=1, description="Number of reward actors (reward-0, reward-1, ...).")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved by each reward actor.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved by each reward actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per reward actor (pins it to marked nodes)."
    )
    ready_timeout_s: float = Field(
        default=900.0, gt=0, allow_inf_nan=False,
        description="Deadline in seconds for every reward actor to start and load its functions (a reward "
        "model included); a late one fails the start naming the actor and what it asks for.",
    )

    def call_deadline_s(self) -> float:
        """The longest one score() call of an actor can take (its functions' own deadlines: a rule or
        builtin one twice, the failed batch and its one-sample reruns; an http one every try plus
        backoff), plus a margin for the transport. Past it the actor is hung, not slow."""
        total = CALL_MARGIN_S
        for f in self.functions:
            if f.kind == "http":
                total += http_worst_case_s(f.timeout_s, f.max_retries, f.retry_backoff_s) + HTTP_DEADLINE_MARGIN_S
            else:
                total += (f.timeout_s or self.timeout_s) * (2 if f.kind in ("rule", "builtin") else 1)
        return total

    @field_validator("timeout_s")
    @classmethod
    def _timeout_in_range(cls, v: float | None) -> float | None:
        return _check_timeout(v)

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        seen: set[str] = set()
        for i, f in enumerate(self.functions):
            if f.name in seen:
                raise ValueError(f"functions[{i}].name: {f.name!r} is used twice; names must be unique")
            seen.add(f.name)
            if f.kind == "model" and f.device == "cuda" and self.num_gpus == 0:
                raise ValueError(
                    f"functions[{i}].device is 'cuda' but num_gpus is 0: Ray hides GPUs from actors that "
                    "reserve none. Set num_gpus (e.g. 1 or 0.25) or device: auto/cpu"
                )
        return self
