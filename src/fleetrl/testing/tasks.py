"""Built-in synthetic datasets: small, deterministic by seed, plain Python.

The "letters" task drives the CPU demo and the end-to-end tests. A prompt asks for one letter
written many times; the rule reward (reward/, not here) is the fraction of non-space characters
of the completion equal to that letter. A random tiny model scores about 1/vocab on it, and a
few dozen GRPO steps move it visibly, which is what a smoke test of RL needs.

Every row format follows the dataset conventions users know from TRL:
prompt / completion, prompt / chosen / rejected, prompt / completion / label.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fleetrl.env.base import Environment, StepResult

LETTERS = ("a", "b", "c", "d", "e")

# {letter} is substituted; every template ends with ":" so completions start with a space.
PROMPT_TEMPLATES = (
    "Write the letter {letter} many times:",
    "Repeat the letter {letter}:",
    "Say {letter} over and over:",
    "Type the letter {letter} again and again:",
)

# Plain words used for "wrong" completions and for the tokenizer corpus.
WORDS = (
    "the", "a", "an", "and", "or", "of", "to", "in", "is", "it", "that", "this", "for", "on",
    "with", "as", "was", "are", "be", "at", "by", "not", "but", "from", "have", "has", "had",
    "you", "we", "they", "he", "she", "i", "my", "your", "our", "their", "what", "which", "who",
    "when", "where", "why", "how", "yes", "no", "good", "bad", "many", "few", "more", "less",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "time",
    "times", "letter", "letters", "word", "words", "write", "say", "type", "repeat", "again",
    "over", "answer", "question", "number", "sum", "plus", "minus", "equals", "think", "step",
    "hello", "world", "cat", "dog", "sun", "moon", "tree", "water", "fire", "red", "blue",
    "green", "small", "big", "fast", "slow", "model", "reward", "learn", "train", "user",
    "assistant", "system", "please", "thanks", "sure", "here", "there", "is", "final",
)

# Marks the final answer in arithmetic strings, like GSM8K ("#### 42").
ANSWER_MARK = "####"

_MIN_RUN, _MAX_RUN = 4, 16


def _rng(seed: int, salt: str) -> random.Random:
    # A separate stream per task so that adding rows to one task never shifts another.
    return random.Random(f"{salt}:{seed}")


def _check_n(n: int, fn: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"fleetrl.testing.tasks.{fn}: n must be a non-negative int, got {n!r}")


def _prompt(rng: random.Random, letter: str) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(letter=letter)


def _good_completion(rng: random.Random, letter: str) -> str:
    """A run of the right letter: reward 1.0 under the letters rule."""
    run = letter * rng.randint(_MIN_RUN, _MAX_RUN)
    if rng.random() < 0.25:  # spaced form; spaces do not count against the reward
        run = " ".join(run)
    return " " + run


def _bad_completion(rng: random.Random, letter: str) -> str:
    """Contains no occurrence of `letter`: reward 0.0 under the letters rule."""
    if rng.random() < 0.5:
        other = rng.choice([x for x in LETTERS if x != letter])
        return " " + other * rng.randint(_MIN_RUN, _MAX_RUN)
    words = [w for w in WORDS if letter not in w]
    return " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))


def letters_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "letter"} for the GRPO demo; letters cycle so every batch is mixed."""
    _check_n(n, "letters_task")
    rng = _rng(seed, "letters")
    rows = []
    for i in range(n):
        letter = LETTERS[(i + seed) % len(LETTERS)]
        rows.append({"prompt": _prompt(rng, letter), "letter": letter})
    return rows


def sft_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "completion", "letter"} where the completion is a right answer."""
    _check_n(n, "sft_task")
    rng = _rng(seed, "sft")
    rows = []
    for row in letters_task(n, seed):
        rows.append({**row, "completion": _good_completion(rng, row["letter"])})
    return rows


def preference_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "chosen", "rejected", "letter"}: chosen scores 1.0, rejected 0.0."""
    _check_n(n, "preference_task")
    rng = _rng(seed, "preference")
    rows = []
    for row in letters_task(n, seed):
        letter = row["letter"]
        rows.append({
            **row,
            "chosen": _good_completion(rng, letter),
            "rejected": _bad_completion(rng, letter),
        })
    return rows


def unpaired_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "completion", "label", "letter"} for KTO; label True marks a good answer.

    Labels alternate so any prefix of the list holds both kinds (KTO needs both in a batch).
    """
    _check_n(n, "unpaired_task")
    rng = _rng(seed, "unpaired")
    rows = []
    for i, row in enumerate(letters_task(n, seed)):
        good = i % 2 == 0
        make = _good_completion if good else _bad_completion
        rows.append({**row, "completion": make(rng, row["letter"]), "label": good})
    return rows


def _arithmetic_lines(rng: random.Random, count: int) -> list[str]:
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        lines.append(f"What is {a} plus {b}? {a} + {b} = {a + b}. {ANSWER_MARK} {a + b}")
    return lines


def tokenizer_corpus() -> list[str]:
    """The text the tiny tokenizer is trained on (deterministic, no seed).

    Covers the task prompts and completions (so single letters and runs like "bbbb" become
    tokens), plain English words, the chat-template role names, digits and "#### 42" strings.
    """
    rng = random.Random("fleetrl-tokenizer-corpus")
    lines: list[str] = []
    for letter in LETTERS:
        for template in PROMPT_TEMPLATES:
            lines.extend([template.format(letter=letter)] * 20)
        for k in range(1, _MAX_RUN + 1):
            # Repeated so runs of every length are frequent enough to become merges.
            lines.extend([" " + letter * k] * (_MAX_RUN + 1 - k) * 4)
            lines.append(" ".join(letter * k))
    for _ in range(400):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
    for role in ("system", "user", "assistant"):
        lines.extend([f"{role}\n"] * 30)
    lines.extend(str(i) for i in range(200))
    lines.extend(_arithmetic_lines(rng, 300))
    return lines


TOKENIZER_CORPUS: tuple[str, ...] = tuple(tokenizer_corpus())


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines (one object per line, UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def two_letters_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "letter", "second"} for the two-turn game (TwoLettersEnv): the prompt asks
    for ``letter``; after the first answer the environment asks for ``second`` (another letter)."""
    _check_n(n, "two_letters_task")
    rng = _rng(seed, "two_letters")
    rows = []
    for row in letters_task(n, seed):
        second = rng.choice([x for x in LETTERS if x != row["letter"]])
        rows.append({**row, "second": second})
    return rows


def letter_share(text: str, letter: str) -> float:
    """Fraction of the non-space characters of ``text`` equal to ``letter`` (0 for no characters)."""
    chars = [ch for ch in text if not ch.isspace()]
    return sum(ch == letter for ch in chars) / len(chars) if chars else 0.0


class TwoLettersEnv(Environment):
    """The two-turn letters game: turn 1 is scored on the row's
    ``letter``; the environment then asks for ``second``, and turn 2 is scored on it. Each turn's
    reward is its letter share, so the episode reward (their sum) needs both turns right."""

    def __init__(self, template: str = "Repeat the letter {letter}:"):
        self.template = template
        self.row: dict[str, Any] = {}
        self.turn = 0

    async def reset(self, row: dict[str, Any]) -> None:
        self.row = row
        return None  # the row's prompt asks for the first letter

    async def step(self, text: str):
        self.turn += 1
        if self.turn == 1:
            return StepResult(observation=self.template.format(letter=self.row["second"]),
                              reward=letter_share(text, self.row["letter"]))
        return StepResult(reward=letter_share(text, self.row["second"]), done=True)


def arithmetic_task(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"prompt", "answer"}: multiply two 3-4 digit numbers, hard without a tool; the answer
    is scored by the builtin numeric_answer (``#### N``). For the tool-calling example on GPU."""
    _check_n(n, "arithmetic_task")
    rng = _rng(seed, "arithmetic")
    rows = []
    for _ in range(n):
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        rows.append({"prompt": f"What is {a} times {b}? You may use the calculator tool. End with the final "
                               f"answer as {ANSWER_MARK} N.", "answer": a * b})
    return rows


# Name -> builder, for configs that say `dataset: builtin:letters` (the CLI resolves the prefix).
BUILTIN_TASKS = {
    "letters": letters_task,
    "sft": sft_task,
    "preference": preference_task,
    "unpaired": unpaired_task,
    "two_letters": two_letters_task,
    "arithmetic": arithmetic_task,
}
