"""Reward functions shipped with fleetrl, selected with `kind: builtin, builtin: NAME, kwargs: {...}`.

Every built-in has the rule-function signature `fn(prompts, completions, **columns) -> list[float]`
and reads its reference from a data column (the column name is a kwarg):

- `exact_match` (kwargs: answer_key="answer"): 1.0 if the stripped completion equals the stripped
  answer (or any of them, when the column holds a list), else 0.0.
- `numeric_answer` (kwargs: answer_key="answer", require_marker=True, tolerance=1e-6): GSM8K style.
  The completion's final answer is the first number after its last `####`; the answer column may be a
  number, a number as text, or a whole GSM8K solution ending in `#### 42`. Commas, `$`, signs and
  decimals are handled. Without `####` the completion scores 0.0, unless require_marker=False, in
  which case its last number is used.
- `format_regex` (kwargs: pattern (required), fullmatch=False): 1.0 if `re.search(pattern,
  completion)` (or `re.fullmatch`) matches. Use inline flags such as `(?s)` or `(?i)` in the pattern.
- `math_answer` (kwargs: answer_key="answer"): 1.0 if the completion's final answer is mathematically
  equal to the reference, checked by the `math_verify` package (LaTeX and plain expressions, `\\boxed{}`
  preferred, fractions, decimals, sets...). The reference may be a bare answer (`42`, `\\frac{1}{2}`), a
  MATH solution with `\\boxed{...}`, or a GSM8K solution ending in `#### 42`; a completion with `####`
  is read after its last marker. A reference with no answer in it is a data error (raised).
- `letter_fraction` (kwargs: letter_key="letter"): the fraction of the completion's non-whitespace
  characters equal to the row's letter (a one-character string); 0.0 for an empty completion. This
  is the reward of the built-in GRPO demo task ("write the letter X").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

RewardFn = Callable[..., list[float]]

# A number: optional sign, then digits with proper thousands groups (1,234,567) or plain digits,
# then optional decimals; or a bare decimal like .5.
_NUMBER = re.compile(r"([-+\u2212]?)\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
GSM8K_MARKER = "####"


def _to_float(match: re.Match[str]) -> float:
    sign, digits = match.group(1), match.group(2).replace(",", "")
    value = float(digits)
    return -value if sign in ("-", "\u2212") else value


def first_number(text: str) -> float | None:
    """The first number in `text` ($ and thousands commas allowed), or None."""
    m = _NUMBER.search(text.replace("$", ""))
    return _to_float(m) if m else None


def last_number(text: str) -> float | None:
    """The last number in `text` ($ and thousands commas allowed), or None."""
    matches = list(_NUMBER.finditer(text.replace("$", "")))
    return _to_float(matches[-1]) if matches else None


def extract_final_answer(completion: str, require_marker: bool = True) -> float | None:
    """The GSM8K final answer of a completion: the first number after its last `####`.

    Without a marker: None if `require_marker`, else the completion's last number.
    """
    _, marker, tail = completion.rpartition(GSM8K_MARKER)
    if marker:
        return first_number(tail)
    return None if require_marker else last_number(completion)


def parse_reference_number(value: Any) -> float:
    """The number in an answer column value: a number, numeric text, or a GSM8K solution with `####`."""
    if isinstance(value, bool):
        raise TypeError(f"answer {value!r} is a boolean, expected a number")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"answer {value!r} is a {type(value).__name__}, expected a number or text")
    _, marker, tail = value.rpartition(GSM8K_MARKER)
    number = first_number(tail if marker else value)
    if number is None:
        raise ValueError(f"answer {value[-80:]!r} contains no number")
    return number


def _column(columns: dict[str, list], key: str, builtin: str, option: str) -> list:
    if key not in columns:
        raise ValueError(
            f"builtin {builtin} reads the data column {key!r} but the batch has columns "
            f"{sorted(columns)}: add the column to the dataset or set kwargs.{option} to the column to use"
        )
    return columns[key]


class _Builtin:
    name: ClassVar[str]
    options: ClassVar[dict[str, Any]]  # option -> default; a default of ... marks a required option

    def __init__(self, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.options))
        if unknown:
            raise ValueError(
                f"builtin {self.name} has no option(s) {unknown}; its kwargs are {sorted(self.options)}"
            )
        for key, default in self.options.items():
            if default is ... and key not in kwargs:
                raise ValueError(f"builtin {self.name} needs kwargs.{key}")
            setattr(self, key, kwargs.get(key, default))
        try:
            self._check()
        except TypeError as e:  # pydantic reports only ValueErrors as validation errors
            raise ValueError(str(e)) from None

    def _check(self) -> None:
        pass

    def _check_key(self, option: str) -> None:
        if not isinstance(getattr(self, option), str) or not getattr(self, option):
            raise TypeError(f"builtin {self.name}: kwargs.{option} must be a column name (text)")


class ExactMatch(_Builtin):
    name = "exact_match"
    options: ClassVar[dict[str, Any]] = {"answer_key": "answer"}

    def _check(self) -> None:
        self._check_key("answer_key")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        answers = _column(columns, self.answer_key, self.name, "answer_key")
        out = []
        for completion, answer in zip(completions, answers, strict=True):
            accepted = answer if isinstance(answer, (list, tuple)) else [answer]
            out.append(float(completion.strip() in {str(a).strip() for a in accepted}))
        return out


class NumericAnswer(_Builtin):
    name = "numeric_answer"
    options: ClassVar[dict[str, Any]] = {"answer_key": "answer", "require_marker": True, "tolerance": 1e-6}

    def _check(self) -> None:
        self._check_key("answer_key")
        if not isinstance(self.require_marker, bool):
            raise TypeError(f"builtin {self.name}: kwargs.require_marker must be true or false")
        if not isinstance(self.tolerance, (int, float)) or not self.tolerance >= 0:
            raise ValueError(f"builtin {self.name}: kwargs.tolerance must be a number >= 0")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        answers = _column(columns, self.answer_key, self.name, "answer_key")
        out = []
        for completion, answer in zip(completions, answers, strict=True):
            reference = parse_reference_number(answer)  # a bad reference is a data error: raise
            got = extract_final_answer(completion, self.require_marker)
            ok = got is not None and math.isclose(got, reference, rel_tol=1e-9, abs_tol=self.tolerance)
            out.append(float(ok))
        return out


class FormatRegex(_Builtin):
    name = "format_regex"
    options: ClassVar[dict[str, Any]] = {"pattern": ..., "fullmatch": False}

    def _check(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"builtin {self.name}: kwargs.pattern must be text (a regular expression)")
        try:
            self._regex = re.compile(self.pattern)
        except re.error as e:
            raise ValueError(
                f"builtin {self.name}: kwargs.pattern {self.pattern!r} is not a valid regular expression: {e}"
            ) from None
        if not isinstance(self.fullmatch, bool):
            raise TypeError(f"builtin {self.name}: kwargs.fullmatch must be true or false")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        match = self._regex.fullmatch if self.fullmatch else self._regex.search
        return [float(match(c) is not None) for c in completions]


class MathAnswer(_Builtin):
    name = "math_answer"
    options: ClassVar[dict[str, Any]] = {"answer_key": "answer"}

    def _check(self) -> None:
        self._check_key("answer_key")

    @staticmethod
    def _parse(text: str) -> list:
        import logging

        from math_verify import parse

        # Its signal-based timeout works only in the main thread; the scorer's timeout_s bounds the call.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _, marker, tail = text.rpartition(GSM8K_MARKER)
        if marker:
            text = tail.strip().replace(",", "").replace("$", "")
        found = parse(text, parsing_timeout=None)
        if not found and "$" not in text:  # bare LaTeX such as \frac12: read it as math
            found = parse(f"${text.strip()}$", parsing_timeout=None)
        return found

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        from math_verify import verify

        answers = _column(columns, self.answer_key, self.name, "answer_key")
        out = []
        for completion, answer in zip(completions, answers, strict=True):
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise TypeError(f"answer {answer!r} is a {type(answer).__name__}, expected text or a number")
            gold = self._parse(str(answer))
            if not gold:
                raise ValueError(f"answer {str(answer)[-80:]!r} holds no answer math_verify can read")
            pred = self._parse(completion)
            out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=None)))
        return out


class LetterFraction(_Builtin):
    name = "letter_fraction"
    options: ClassVar[dict[str, Any]] = {"letter_key": "letter"}

    def _check(self) -> None:
        self._check_key("letter_key")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        letters = _column(columns, self.letter_key, self.name, "letter_key")
        out = []
        for completion, letter in zip(completions, letters, strict=True):
            if not isinstance(letter, str) or len(letter) != 1:
                raise ValueError(f"column {self.letter_key!r} must hold one character per row, got {letter!r}")
            chars = [ch for ch in completion if not ch.isspace()]
            out.append(sum(ch == letter for ch in chars) / len(chars) if chars else 0.0)
        return out


BUILTINS: dict[str, type[_Builtin]] = {
    cls.name: cls for cls in (ExactMatch, NumericAnswer, MathAnswer, FormatRegex, LetterFraction)
}


def make_builtin(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """The built-in reward function `name` with options `kwargs`; ValueError naming a bad option."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin {name!r}; choose one of {sorted(BUILTINS)}")
    return BUILTINS[name](**(kwargs or {}))
