"""RewardScorer: runs every configured function on a batch and sums them with their weights.

A function's value for a sample is invalid when the function raises, returns a list of the wrong
length, or returns something that is not a finite number for that sample. With `on_error: fail` the
first invalid value raises `RewardError`, naming the function, the sample, a preview of its prompt
and completion and the exception. With `on_error: zero` invalid values count as 0 for that function
and each is listed in `ScoreResult.errors`. When a rule or built-in function raises on a batch, it is
run again one sample at a time to find the samples that fail (the others keep their scores); a model
or HTTP scorer that raises fails the whole batch.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetrl.reward.config import RewardConfig
from fleetrl.reward.rules import RewardLoadError

PREVIEW_CHARS = 160


class RewardError(RuntimeError):
    """A reward function failed on a sample while reward.on_error is 'fail'."""


@dataclass
class RewardErrorInfo:
    function: str
    index: int
    message: str
    prompt_preview: str
    completion_preview: str


@dataclass
class ScoreResult:
    rewards: list[float]  # weighted sum over functions, one per sample
    per_function: dict[str, list[float]]  # unweighted values; 0.0 where the function failed
    errors: list[RewardErrorInfo] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per function


def preview(text: Any, limit: int = PREVIEW_CHARS) -> str:
    """Start and end of a long text (the end of a completion is usually what a reward reads)."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def _describe_exception(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _check_value(value: Any) -> tuple[float, str | None]:
    """(float value, None) or (0.0, why it is not a valid reward)."""
    if value is None or isinstance(value, (str, bytes)):
        return 0.0, f"returned {value!r} ({type(value).__name__}), expected a float"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0, f"returned {preview(repr(value), 60)} ({type(value).__name__}), expected a float"
    if not math.isfinite(number):
        return 0.0, f"returned a non-finite value {number}"
    return number, None


@dataclass
class _Function:
    name: str
    label: str  # e.g. "rule rewards.py:acc", for messages
    weight: float
    fn: Callable[..., Any]
    isolatable: bool  # cheap and meaningful to rerun one sample at a time


def build_function(fc, base_dir: str | Path | None) -> _Function:
    """The callable for one function config; RewardLoadError (or ImportError) naming the function."""
    try:
        if fc.kind == "rule":
            from fleetrl.reward.rules import load_rule_function

            return _Function(fc.name, f"rule {fc.path}", fc.weight, load_rule_function(fc.path, base_dir), True)
        if fc.kind == "builtin":
            from fleetrl.reward.builtins import make_builtin

            return _Function(fc.name, f"builtin {fc.builtin}", fc.weight, make_builtin(fc.builtin, fc.kwargs), True)
        if fc.kind == "model":
            from fleetrl.reward.model_scorer import RewardModelScorer

            fn = RewardModelScorer(
                fc.model_path, fc.max_length, fc.batch_size, fc.normalize, fc.device, fc.truncation_side
            )
            return _Function(fc.name, f"model {fc.model_path}", fc.weight, fn, False)
        if fc.kind == "http":
            from fleetrl.reward.http_scorer import HttpScorer

            fn = HttpScorer(fc.url, fc.timeout_s, fc.max_retries, fc.headers, fc.retry_backoff_s)
            return _Function(fc.name, f"http {fc.url}", fc.weight, fn, False)
    except (RewardLoadError, ValueError) as e:
        raise RewardLoadError(f"reward function {fc.name!r} ({fc.kind}): {e}") from e
    raise ValueError(f"unknown reward function kind {fc.kind!r}")


class RewardScorer:
    """Scores batches with the functions of a RewardConfig; see the module docstring for errors."""

    def __init__(self, cfg: RewardConfig | dict, base_dir: str | Path | None = None):
        self.cfg = cfg if isinstance(cfg, RewardConfig) else RewardConfig.model_validate(cfg)
        self.base_dir = base_dir
        if not self.cfg.functions:
            raise RewardLoadError(
                "reward.functions is empty: add at least one reward function (kind: rule, builtin, model "
                "or http) to score samples"
            )
        self.functions = [build_function(fc, base_dir) for fc in self.cfg.functions]

    def describe(self) -> list[dict]:
        """Name, kind and weight of each function (also a cheap readiness check for actors)."""
        return [{"name": f.name, "function": f.label, "weight": f.weight} for f in self.functions]

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: dict[str, list] | None = None,
    ) -> ScoreResult:
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in (columns or {}).items()}
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"score() got {len(prompts)} prompts but {n} completions; pass one prompt per completion")
        for key, values in columns.items():
            if key in ("prompts", "completions"):
                raise ValueError(f"column {key!r} clashes with the argument of the same name; rename it")
            if len(values) != n:
                raise ValueError(
                    f"column {key!r} has {len(values)} values for {n} completions; pass one per completion")
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise TypeError(f"completion {i} is a {type(c).__name__}, expected str")

        rewards = [0.0] * n
        per_function: dict[str, list[float]] = {}
        errors: list[RewardErrorInfo] = []
        seconds: dict[str, float] = {}
        if n == 0:
            return ScoreResult([], {f.name: [] for f in self.functions}, [], {})
        for func in self.functions:
            start = time.perf_counter()
            values, failures = self._run(func, prompts, completions, columns)
            seconds[func.name] = time.perf_counter() - start
            infos = [
                RewardErrorInfo(func.name, i, msg, preview(prompts[i]), preview(completions[i])) for i, msg in failures
            ]
            if infos and self.cfg.on_error == "fail":
                raise RewardError(self._fail_message(func, infos, n))
            errors.extend(infos)
            per_function[func.name] = values
            for i, v in enumerate(values):
                rewards[i] += func.weight * v
        return ScoreResult(rewards, per_function, errors, seconds)

    @staticmethod
    def _fail_message(func: _Function, infos: list[RewardErrorInfo], n: int) -> str:
        first = infos[0]
        more = f" ({len(infos) - 1} more samples of this batch failed too)" if len(infos) > 1 else ""
        return (
            f"reward function {func.name!r} ({func.label}) failed on sample {first.index} of {n}: "
            f"{first.message}{more}\n"
            f"  prompt: {first.prompt_preview!r}\n"
            f"  completion: {first.completion_preview!r}\n"
            "Fix the function, or set reward.on_error: zero to score failing samples 0 and count them "
            "in the metrics."
        )

    def _run(
        self, func: _Function, prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> tuple[list[float], list[tuple[int, str]]]:
        """Values (0.0 where invalid) and (sample index, message) for each invalid sample."""
        n = len(completions)
        try:
            raw = func.fn(prompts, completions, **columns)
        except Exception as e:  # noqa: BLE001 - user code may raise anything; policy decides
            if func.isolatable and n > 1:
                return self._run_one_by_one(func, prompts, completions, columns)
            message = f"raised {_describe_exception(e)}"
            return [0.0] * n, [(i, message) for i in range(n)]
        if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
            message = f"returned a {type(raw).__name__}, expected a list of {n} floats (one per completion)"
            return [0.0] * n, [(i, message) for i in range(n)]
        raw = list(raw)
        if len(raw) != n:
            message = f"returned {len(raw)} values for {n} completions (it must return one float per completion)"
            return [0.0] * n, [(i, message) for i in range(n)]
        values, failures = [], []
        for i, item in enumerate(raw):
            value, why = _check_value(item)
            values.append(value)
            if why:
                failures.append((i, why))
        return values, failures

    def _run_one_by_one(
        self, func: _Function, prompts: list[str], completions: list[str], columns: dict[str, list]
    ) -> tuple[list[float], list[tuple[int, str]]]:
        values, failures = [], []
        for i in range(len(completions)):
            sub_values, sub_failures = self._run(
                func, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()}
            )
            values.append(sub_values[0])
            failures.extend((i, msg) for _, msg in sub_failures)
        return values, failures

    def state_dict(self) -> dict:
        """Running state of the functions that have one (reward-model normalization statistics)."""
        return {f.name: f.fn.state_dict() for f in self.functions if hasattr(f.fn, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for f in self.functions:
            if f.name in state and hasattr(f.fn, "load_state_dict"):
                f.fn.load_state_dict(state[f.name])
