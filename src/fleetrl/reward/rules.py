"""Rule functions: user Python loaded from `path/to/file.py:function`.

The function scores a whole batch:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
        # columns holds the other fields of the data rows, one list each, e.g. columns["answer"]
        return [float(c.strip() == a) for c, a in zip(completions, columns["answer"])]

It must return one finite float per completion (numbers, bools, numpy or 0-d torch scalars are fine).
Columns can also be named parameters, `def my_reward(prompts, completions, answer)`: a function
without `**columns` receives only the columns it names. The path is relative to the directory of the
config file (`base_dir`), else to the current directory; absolute paths work as they are. Under Ray
the file must exist on the node of each reward actor (ship it with the job's `working_dir`).

TRL's reward functions work unchanged. A function whose first parameter is named `completions`
(`def accuracy_reward(completions, solution, **kwargs)`) is called TRL's way, by keyword: `completions`
(and `prompts` when it takes them) hold plain strings for plain-text data, and message lists for
conversational data (`prompts[i]` is the row's message list, `completions[i]` is
`[{"role": "assistant", "content": text}]`); the data's other columns come as keyword arguments; a
`None` for a sample leaves that function out of the sample's reward (TRL's rule) and is counted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path


class RewardLoadError(ValueError):
    """A reward function could not be built from its config (file, function, model, options)."""


def resolve_rule_path(spec: str, base_dir: str | Path | None) -> tuple[Path, str]:
    """Split `file.py:function` and find the file: absolute, else under base_dir, else under the CWD."""
    file_part, sep, fn_name = spec.rpartition(":")
    if not sep or not file_part or not fn_name:
        raise RewardLoadError(f"rule path {spec!r} must look like 'path/to/file.py:function_name'")
    file_path = Path(file_part).expanduser()
    if file_path.is_absolute():
        candidates = [file_path]
    else:
        candidates = [Path(d) / file_path for d in (base_dir, Path.cwd()) if d is not None]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve(), fn_name
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise RewardLoadError(
        f"rule path {spec!r}: file {file_part!r} not found (tried {tried}). Paths are relative to the "
        "directory of the config file, else to the current directory"
    )


def _load_module(file_path: Path, spec: str):
    # A name unique per file so two rule files called rewards.py do not replace each other.
    digest = hashlib.sha1(str(file_path).encode()).hexdigest()[:10]
    module_name = f"fleetrl_rule_{file_path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, file_path)
    if module_spec is None or module_spec.loader is None:
        raise RewardLoadError(f"rule path {spec!r}: {file_path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # so classes and pickling inside the module resolve
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[module_name]
        raise RewardLoadError(
            f"rule path {spec!r}: syntax error in {e.filename or file_path} line {e.lineno}: {e.msg}"
        ) from e
    except BaseException as e:
        del sys.modules[module_name]
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(file_path)]
        where = f" line {frames[-1].lineno}" if frames else ""
        raise RewardLoadError(
            f"rule path {spec!r}: importing {file_path} raised {type(e).__name__}{where}: {e}"
        ) from e
    return module


class RuleFunction:
    """A loaded user function, called as fn(prompts, completions, **columns) with the columns it accepts,
    or TRL's way (``trl_style``: first parameter ``completions``, every argument by keyword)."""

    trl_style = False

    def __init__(self, fn: Callable, spec: str):
        self.fn = fn
        self.spec = spec
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # some C callables have no signature: pass every column
            self._takes_all, self._named = True, set()
            return
        if params and params[0].name == "completions" and params[0].kind != params[0].VAR_POSITIONAL:
            self.trl_style = True
            self._takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
            self._named = {p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            return
        positional = [
            p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise RewardLoadError(
                f"rule {spec!r}: the function must take (prompts, completions, **columns), or TRL's "
                f"(completions, **kwargs) with `completions` first; its signature is {inspect.signature(fn)}"
            )
        self._takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        # Columns it names beyond the first two positional parameters (prompts, completions).
        self._named = {p.name for p in positional[2:]} | {p.name for p in params if p.kind == p.KEYWORD_ONLY}

    def required_columns(self) -> set[str]:
        """Data columns the function names without a default (checked against the data before a run)."""
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return set()
        skip = 1 if self.trl_style else 2
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][skip:]
        return {p.name for p in named if p.default is p.empty and p.name not in TRL_ARGUMENTS}

    def __call__(self, prompts: Sequence, completions: Sequence[str], raw_prompts: Sequence | None = None,
                 **columns: list) -> list[float]:
        if self.trl_style:
            return self._call_trl(prompts, completions, raw_prompts, columns)
        if not self._takes_all:
            columns = {k: v for k, v in columns.items() if k in self._named}
        return self.fn(list(prompts), list(completions), **columns)

    def _call_trl(self, prompts, completions, raw_prompts, columns: dict) -> list:
        raw = list(raw_prompts) if raw_prompts is not None else list(prompts)
        chat = [isinstance(p, list) for p in raw]
        kwargs = {**columns, "prompts": raw,
                  "completions": [[{"role": "assistant", "content": c}] if conv else c
                                  for c, conv in zip(completions, chat)]}
        if not self._takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self._named or k == "completions"}
        return self.fn(**kwargs)


# Keyword arguments TRL itself passes (not data columns): never required from the data.
TRL_ARGUMENTS = frozenset({"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"})


def load_rule_function(spec: str, base_dir: str | Path | None = None) -> RuleFunction:
    """Import `file.py:function` (see the module docstring); RewardLoadError naming path and function."""
    file_path, fn_name = resolve_rule_path(spec, base_dir)
    module = _load_module(file_path, spec)
    if not hasattr(module, fn_name):
        defined = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise RewardLoadError(
            f"rule path {spec!r}: {file_path} has no function {fn_name!r} (functions defined there: {defined})"
        )
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise RewardLoadError(
            f"rule path {spec!r}: {fn_name!r} in {file_path} is a {type(fn).__name__}, not a function"
        )
    return RuleFunction(fn, spec)
