"""RewardScorer: runs every configured function on a batch and sums them with their weights.

A function's value for a sample is invalid when the function raises, returns a list of the wrong
length, or returns something that is not a finite number for that sample. With `on_error: fail` the
first invalid value raises `RewardError`, naming the function, the sample, a preview of its prompt
and completion and the exception. With `on_error: zero` invalid values count as 0 for that function
and each is listed in `ScoreResult.errors`. When a rule or built-in function raises on a batch, it is
run again one sample at a time to find the samples that fail (the others keep their scores); a model
or HTTP scorer that raises fails the whole batch. The one-sample reruns share one deadline, the
function's own: a batch of n samples costs at most two deadlines, never n; samples the reruns did
not reach are invalid ("not scored: ...") and follow `on_error`.

Deadlines. Every call of a function runs in a daemon thread of its own, and the scorer waits for it
at most the function's deadline: `functions[i].timeout_s`, else `reward.timeout_s` (an http
function's deadline is its own worst case, every try plus backoff, plus a margin; the HTTP scorer
ends each try itself). A call past its deadline is invalid for every sample of the call, with the
message "timed out after X s" and the line the call was running, and follows `on_error` like a
raising call; it is not rerun one sample at a time. A Python thread cannot be killed: the abandoned
call keeps running in the background until it returns (its result is dropped), may run at the same
time as later calls of the same function, and holds its memory. `ScoreResult.hung_calls` counts such
calls per function. Once `MAX_HUNG_CALLS` calls of one function are still running, the function is
treated as broken: every later score() raises `RewardHungError` (whatever `on_error` says) until they
return; restarting the reward actor frees them. Code that holds the GIL without release (a regular
expression with catastrophic backtracking, some C extensions) also blocks the scorer's wait, so no
deadline can help there; and code that needs the main thread (`signal.alarm`-based timeouts) fails in
the worker thread: turn those off, `timeout_s` replaces them.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetrl.reward.config import HTTP_DEADLINE_MARGIN_S, RewardConfig
from fleetrl.reward.rules import RewardLoadError

PREVIEW_CHARS = 160
MAX_HUNG_CALLS = 4  # calls of one function still running past their deadline before it counts as broken


class RewardError(RuntimeError):
    """A reward function failed on a sample while reward.on_error is 'fail'."""


class RewardHungError(RewardError):
    """A reward function has MAX_HUNG_CALLS calls still running past their deadline; it is not called again.

    Raised whatever reward.on_error says. The threads are freed only when the calls return or the
    process (the reward actor) ends.
    """


class _CallTimeout(Exception):
    """A call did not return within its deadline; the message is the per-sample error message."""


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
    # Calls past their deadline still running in the background, per function with any (a gauge).
    hung_calls: dict[str, int] = field(default_factory=dict)
    # Samples a TRL-style function returned None for (left out of that sample's sum), per function with any.
    skipped: dict[str, int] = field(default_factory=dict)


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
    timeout_s: float | None = None  # deadline of one call; None: reward.timeout_s (set by RewardScorer)
    timeout_source: str = "reward.timeout_s"  # the setting to change, for messages
    where: str = ""  # the file of a rule function, for messages
    hung: int = 0  # calls past their deadline still running
    timed_out: int = 0  # calls that ever passed their deadline
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class _Call:
    """One call of a function in a daemon thread (daemon: a hung call does not keep the process alive)."""

    def __init__(self, func: _Function, args: tuple, kwargs: dict):
        self.func = func
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.abandoned = False  # decided under func.lock, with done, so a call is counted hung at most once
        self.thread = threading.Thread(
            target=self._run, args=(args, kwargs), name=f"reward-{func.name}", daemon=True
        )

    def _run(self, args: tuple, kwargs: dict) -> None:
        try:
            self.value = self.func.fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
        finally:
            with self.func.lock:
                self.done.set()
                if self.abandoned:
                    self.func.hung -= 1
                    self.value = self.error = None  # nobody reads them; free the memory


_STDLIB = sysconfig.get_paths()["stdlib"]


def _running_at(thread: threading.Thread) -> str:
    """' (it was running file:line in function)': the innermost frame of a thread outside the stdlib."""
    frame = sys._current_frames().get(thread.ident)  # noqa: SLF001 - the documented way to see a thread's stack
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)
    own = [f for f in stack if not f.filename.startswith(_STDLIB) and not f.filename.startswith("<")]
    top = (own or stack)[-1]
    return f" (it was running {top.filename}:{top.lineno} in {top.name})"


def build_function(fc, base_dir: str | Path | None) -> _Function:
    """The callable for one function config; RewardLoadError (or ImportError) naming the function."""
    try:
        if fc.kind == "rule":
            from fleetrl.reward.rules import load_rule_function

            fn = load_rule_function(fc.path, base_dir)
            code = getattr(fn.fn, "__code__", None)
            return _Function(fc.name, f"rule {fc.path}", fc.weight, fn, True, fc.timeout_s,
                             where=code.co_filename if code is not None else "")
        if fc.kind == "builtin":
            from fleetrl.reward.builtins import make_builtin

            return _Function(fc.name, f"builtin {fc.builtin}", fc.weight, make_builtin(fc.builtin, fc.kwargs), True,
                             fc.timeout_s)
        if fc.kind == "model":
            from fleetrl.reward.model_scorer import RewardModelScorer

            fn = RewardModelScorer(
                fc.model_path, fc.max_length, fc.batch_size, fc.normalize, fc.device, fc.truncation_side
            )
            return _Function(fc.name, f"model {fc.model_path}", fc.weight, fn, False, fc.timeout_s)
        if fc.kind == "http":
            from fleetrl.reward.http_scorer import HttpScorer

            fn = HttpScorer(fc.url, fc.timeout_s, fc.max_retries, fc.headers, fc.retry_backoff_s,
                            fc.max_response_bytes)
            deadline = fn.worst_case_s() + HTTP_DEADLINE_MARGIN_S
            return _Function(fc.name, f"http {fc.url}", fc.weight, fn, False, deadline,
                             "the http function's timeout_s (per try)")
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
        for i, (func, fc) in enumerate(zip(self.functions, self.cfg.functions)):
            if func.timeout_s is None:
                func.timeout_s = self.cfg.timeout_s
            elif fc.kind != "http":
                func.timeout_source = f"reward.functions[{i}].timeout_s"

    def describe(self) -> list[dict]:
        """Name, kind and weight of each function (also a cheap readiness check for actors)."""
        return [{"name": f.name, "function": f.label, "weight": f.weight} for f in self.functions]

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        columns: dict[str, list] | None = None,
        raw_prompts: Sequence | None = None,
    ) -> ScoreResult:
        """``raw_prompts``: each row's prompt as written in the data (a string or a message list), for
        TRL-style functions; ``prompts`` are the rendered texts the model continued."""
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in (columns or {}).items()}
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"score() got {len(prompts)} prompts but {n} completions; pass one prompt per completion")
        for key, values in columns.items():
            if key in ("prompts", "completions", "raw_prompts"):
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
        skipped: dict[str, int] = {}
        if n == 0:
            return ScoreResult([], {f.name: [] for f in self.functions}, [], {})
        for func in self.functions:
            self._refuse_if_broken(func)
        for func in self.functions:
            start = time.perf_counter()
            cols = columns
            if getattr(func.fn, "trl_style", False):  # a column, so one-sample reruns slice it too
                cols = {**columns, "raw_prompts": list(raw_prompts) if raw_prompts is not None else list(prompts)}
            values, failures = self._run(func, prompts, completions, cols)
            left_out = [i for i, v in enumerate(values) if v is None]
            if left_out:
                skipped[func.name] = len(left_out)
                values = [0.0 if v is None else v for v in values]  # 0 weight in the sum: left out
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
        return ScoreResult(rewards, per_function, errors, seconds, self.hung_calls(), skipped)

    def hung_calls(self) -> dict[str, int]:
        """Calls past their deadline still running, per function that has any."""
        return {f.name: f.hung for f in self.functions if f.hung}

    def _refuse_if_broken(self, func: _Function) -> None:
        with func.lock:
            hung = func.hung
        if hung < MAX_HUNG_CALLS:
            return
        where = f", file {func.where}" if func.where else ""
        raise RewardHungError(
            f"reward function {func.name!r} ({func.label}{where}) is broken: {hung} of its calls passed their "
            f"deadline of {func.timeout_s:g} s ({func.timeout_source}) and are still running in background "
            f"threads ({func.timed_out} timed out in all). It is not called again while {MAX_HUNG_CALLS} are "
            "running, whatever reward.on_error says. Make the function return (look for a loop or a wait that "
            "never ends) or raise its timeout; restarting the reward actor frees the threads."
        )

    def _call(self, func: _Function, prompts: list[str], completions: list[str], columns: dict[str, list],
              timeout_s: float | None = None) -> Any:
        """func.fn(prompts, completions, **columns) within ``timeout_s`` (default func.timeout_s);
        _CallTimeout when it does not return."""
        self._refuse_if_broken(func)
        call = _Call(func, (prompts, completions), columns)
        call.thread.start()
        timeout_s = func.timeout_s if timeout_s is None else timeout_s
        timeout = min(timeout_s, threading.TIMEOUT_MAX)
        if not call.done.wait(timeout):
            with func.lock:
                if not call.done.is_set():
                    call.abandoned = True
                    func.hung += 1
                    func.timed_out += 1
            if call.abandoned:
                took = f"{func.timeout_s:g} s" if timeout_s == func.timeout_s else \
                    f"{timeout_s:.2f} s (what was left of the one-sample reruns' deadline of {func.timeout_s:g} s)"
                raise _CallTimeout(
                    f"timed out after {took}{_running_at(call.thread)}; the call goes on in a "
                    f"background thread. Make the function faster or raise {func.timeout_source}"
                )
        if call.error is not None:
            raise call.error
        return call.value

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
        self, func: _Function, prompts: list[str], completions: list[str], columns: dict[str, list],
        timeout_s: float | None = None,
    ) -> tuple[list[float], list[tuple[int, str]]]:
        """Values (0.0 where invalid) and (sample index, message) for each invalid sample."""
        n = len(completions)
        try:
            raw = self._call(func, prompts, completions, columns, timeout_s)
        except _CallTimeout as e:  # not rerun one sample at a time: that could take n deadlines
            return [0.0] * n, [(i, str(e)) for i in range(n)]
        except RewardHungError:
            raise
        except Exception as e:  # noqa: BLE001 - user code may raise anything; policy decides
            if func.isolatable and n > 1:
                return self._run_one_by_one(func, prompts, completions, columns, e)
            message = f"raised {_describe_exception(e)}"
            if "signal only works in main thread" in str(e):
                message += (
                    " (reward functions run in a worker thread so that timeout_s can stop waiting for them: "
                    "turn off signal-based timeouts inside the function, e.g. math_verify's parsing_timeout "
                    "and timeout_seconds)"
                )
            return [0.0] * n, [(i, message) for i in range(n)]
        if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
            message = f"returned a {type(raw).__name__}, expected a list of {n} floats (one per completion)"
            return [0.0] * n, [(i, message) for i in range(n)]
        raw = list(raw)
        if len(raw) != n:
            message = f"returned {len(raw)} values for {n} completions (it must return one float per completion)"
            return [0.0] * n, [(i, message) for i in range(n)]
        values, failures = [], []
        trl = getattr(func.fn, "trl_style", False)
        for i, item in enumerate(raw):
            if trl and item is None:  # TRL: None means "this function does not apply to the sample"
                values.append(None)
                continue
            value, why = _check_value(item)
            values.append(value)
            if why:
                failures.append((i, why))
        return values, failures

    def _run_one_by_one(
        self, func: _Function, prompts: list[str], completions: list[str], columns: dict[str, list],
        batch_error: BaseException,
    ) -> tuple[list[float], list[tuple[int, str]]]:
        """Each sample alone, all within one deadline (func.timeout_s in total, not per sample)."""
        values, failures = [], []
        deadline = time.monotonic() + func.timeout_s
        for i in range(len(completions)):
            left = deadline - time.monotonic()
            if left <= 0:
                message = (
                    f"not scored: the batch raised {_describe_exception(batch_error)}, and rerunning its "
                    f"samples one at a time to find the failing ones used up the function's deadline of "
                    f"{func.timeout_s:g} s ({func.timeout_source}) before sample {i}. Fix the error, make the "
                    f"function faster or raise {func.timeout_source}"
                )
                values.extend([0.0] * (len(completions) - i))
                failures.extend((j, message) for j in range(i, len(completions)))
                break
            sub_values, sub_failures = self._run(
                func, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()}, left
            )
            values.append(sub_values[0])  # None stays None: left out
            failures.extend((i, msg) for _, msg in sub_failures)
        return values, failures

    def state_dict(self) -> dict:
        """Running state of the functions that have one (reward-model normalization statistics)."""
        return {f.name: f.fn.state_dict() for f in self.functions if hasattr(f.fn, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for f in self.functions:
            if f.name in state and hasattr(f.fn, "load_state_dict"):
                f.fn.load_state_dict(state[f.name])
