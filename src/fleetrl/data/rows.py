"""Dataset loading: files on disk -> normalized rows (TRL's conventions) -> an endless prompt stream.

Row kinds follow TRL, so datasets prepared for it load unchanged:

- prompt:     ``prompt``
- preference: ``prompt``, ``chosen``, ``rejected`` (or no ``prompt`` when chosen/rejected are whole
  conversations sharing it: the shared prefix becomes the prompt)
- unpaired:   ``prompt``, ``completion``, ``label`` (bool)
- sft:        ``prompt`` + ``completion``, or ``messages`` (the last assistant turn is the completion)

Every value is a plain string or a conversational message list ``[{"role": ..., "content": ...}]``.
Any other column is carried untouched in ``row.extra`` (reward functions read e.g. ``answer`` from it).
A malformed row raises :class:`DataError` naming the file, the line or row, the field and the fix.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from fleetrl.core.strict import StrictModel

RowKind = Literal["prompt", "preference", "unpaired", "sft"]
Messages = list[dict[str, Any]]
Content = str | Messages

_ROW_KINDS: tuple[str, ...] = ("prompt", "preference", "unpaired", "sft")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Key fields of DataConfig, so errors can name the setting that renames a column.
_KEY_FIELDS = ("prompt_key", "chosen_key", "rejected_key", "completion_key", "label_key", "messages_key")


class DataError(ValueError):
    """A dataset problem the user must fix; the message says where and how."""


class DataConfig(StrictModel):
    """Where the training data lives and how its columns are named."""

    # A file, a datasets directory (save_to_disk), a hub dataset name (read from the local cache when
    # offline), or a datasets builder (json, csv, parquet) with data_files.
    path: str = Field(min_length=1)
    format: Literal["auto", "jsonl", "json", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"  # of a saved datasets.DatasetDict or a hub dataset (slices too: "train[:1000]")
    name: str | None = None  # a hub dataset's configuration, e.g. "main" for openai/gsm8k
    # Files for datasets.load_dataset(path, data_files=...): one, a list, or {split: files}; relative to
    # the config file. Several files are read as one dataset.
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    # Read a hub dataset (or data_files) as a stream instead of converting it all first: for large data.
    streaming: bool = False
    kind: Literal["auto", "prompt", "preference", "unpaired", "sft"] = "auto"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    completion_key: str = "completion"
    label_key: str = "label"
    messages_key: str = "messages"
    max_rows: int | None = Field(default=None, ge=1)
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    eval_path: str | None = None
    shuffle: bool = True
    seed: int = 0
    apply_chat_template: bool = True  # only takes effect when the tokenizer has a chat template

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.eval_path is not None and self.eval_fraction > 0:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")
        names = [getattr(self, f) for f in _KEY_FIELDS]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.*_key settings must name different columns; {dupes} is used twice")
        return self


# ---------------------------------------------------------------------------------------------
# Normalized rows. Each content field holds a str or a message list; the *_text / *_messages
# properties give the one that is set (the other is None).


class _PromptMixin:
    prompt: Content

    @property
    def prompt_text(self) -> str | None:
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def prompt_messages(self) -> Messages | None:
        return self.prompt if isinstance(self.prompt, list) else None

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


class _CompletionMixin:
    completion: Content

    @property
    def completion_text(self) -> str | None:
        return self.completion if isinstance(self.completion, str) else None

    @property
    def completion_messages(self) -> Messages | None:
        return self.completion if isinstance(self.completion, list) else None


@dataclass(kw_only=True)
class PromptRow(_PromptMixin):
    prompt: Content
    extra: dict[str, Any]
    source: str  # "file.jsonl:17" / "file.parquet row 17", for errors and metrics


@dataclass(kw_only=True)
class PreferenceRow(_PromptMixin):
    prompt: Content
    chosen: Content
    rejected: Content
    extra: dict[str, Any]
    source: str

    @property
    def chosen_text(self) -> str | None:
        return self.chosen if isinstance(self.chosen, str) else None

    @property
    def chosen_messages(self) -> Messages | None:
        return self.chosen if isinstance(self.chosen, list) else None

    @property
    def rejected_text(self) -> str | None:
        return self.rejected if isinstance(self.rejected, str) else None

    @property
    def rejected_messages(self) -> Messages | None:
        return self.rejected if isinstance(self.rejected, list) else None


@dataclass(kw_only=True)
class UnpairedRow(_PromptMixin, _CompletionMixin):
    prompt: Content
    completion: Content
    label: bool
    extra: dict[str, Any]
    source: str


@dataclass(kw_only=True)
class SFTRow(_PromptMixin, _CompletionMixin):
    prompt: Content
    completion: Content
    extra: dict[str, Any]
    source: str


Row = PromptRow | PreferenceRow | UnpairedRow | SFTRow


# ---------------------------------------------------------------------------------------------
# Reading records from disk: each reader yields (source, dict) in file order.


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """The concrete format of `path`: `fmt` itself unless "auto", else from the suffix / directory."""
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "hf_disk"
    found = _SUFFIX_FORMATS.get(p.suffix.lower())
    if found is None:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise DataError(
            f"{path}: cannot tell the data format from the suffix {p.suffix!r} (known: {known}, or a "
            "directory saved with datasets' save_to_disk); set data.format to jsonl, json, parquet or hf_disk"
        )
    return found


def _read_jsonl(path: Path, max_rows: int | None) -> Iterator[tuple[str, dict]]:
    count = 0
    try:
        # utf-8-sig: tolerate a byte-order mark written by some editors.
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if max_rows is not None and count >= max_rows:
                    return
                if not line.strip():
                    continue  # blank lines (often a trailing newline pair) are not rows
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        "each line of a JSON Lines file must be one complete JSON object"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object per line, found {_describe(record)}"
                    )
                count += 1
                yield f"{path}:{lineno}", record
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None


def _read_json(path: Path, max_rows: int | None) -> Iterator[tuple[str, dict]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        hint = "the file must hold one JSON document"
        if e.msg == "Extra data":
            hint = (
                "this looks like JSON Lines (one object per line): name it .jsonl or set data.format='jsonl'"
            )
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); {hint}") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(
            f'{path}: expected a JSON list of row objects or {{"data": [...]}}, found {_describe(payload)}'
        )
    for i, record in enumerate(payload[:max_rows] if max_rows is not None else payload):
        source = f"{path} row {i + 1}"
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected a JSON object, found {_describe(record)}")
        yield source, record


def _read_parquet(path: Path, max_rows: int | None) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read as parquet ({e}); check the file or set data.format") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    for i, record in enumerate(table.to_pylist()):
        yield f"{path} row {i + 1}", record


def _read_hf_disk(path: Path, split: str, max_rows: int | None) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy import: only when a datasets directory is actually used

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{path}: not a dataset saved with datasets' save_to_disk ({e}); "
            "point data.path at such a directory or at a .jsonl/.json/.parquet file"
        ) from None
    label = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: split {split!r} not found (splits: {', '.join(ds.keys())}); set data.split"
            )
        ds = ds[split]
        label = f"{path}[{split}]"
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    for i, record in enumerate(ds.to_list()):
        yield f"{label} row {i + 1}", record


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_dataset_name(path: str) -> bool:
    """``org/name`` or a builder (``json``): no data-file suffix, the shape of a hub dataset name."""
    return bool(_HUB_NAME.match(path)) and Path(path).suffix.lower() not in _SUFFIX_FORMATS


def is_hub_name(path: str) -> bool:
    """A dataset name (see looks_like_dataset_name) that is not a file or directory here."""
    return looks_like_dataset_name(path) and not Path(path).exists()


def _read_datasets(cfg: DataConfig, path: str, max_rows: int | None) -> Iterator[tuple[str, dict]]:
    """Rows through datasets.load_dataset: a hub name (local cache when offline) or a builder + data_files."""
    import datasets  # heavy import: only when used

    label = (f"{path}" + (f" {cfg.data_files}" if cfg.data_files is not None else "") + f"[{cfg.split}]"
             + (f" ({cfg.name})" if cfg.name else ""))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per file and split: noise on the console and in train.log
    try:
        ds = datasets.load_dataset(path, cfg.name, data_files=cfg.data_files, split=cfg.split,
                                   streaming=cfg.streaming)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        where = ("HF_HUB_OFFLINE is set, so only the local cache (HF_HOME / HF_DATASETS_CACHE) is read"
                 if offline else "it is neither a local file nor reachable on the hub")
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(
            f"data.path {path!r}: dataset not found ({first}); {where}. Download it once where the hub is "
            "reachable (it is then read from the cache with HF_HUB_OFFLINE=1), or point data.path at a local "
            ".jsonl/.json/.parquet file or a save_to_disk directory"
        ) from None
    except ValueError as e:  # a bad split or configuration name: datasets lists the valid ones
        raise DataError(f"data.path {path!r}: {str(e).splitlines()[0][:300]}; check data.split and data.name") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if max_rows is not None:
        ds = ds.take(max_rows) if cfg.streaming else ds.select(range(min(max_rows, len(ds))))
    for i, record in enumerate(ds):
        yield f"{label} row {i + 1}", dict(record)


def read_records(
    path: str | Path, fmt: str = "auto", split: str = "train", max_rows: int | None = None,
    cfg: DataConfig | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yield (source, raw row dict) from a data file, datasets directory or hub dataset, in order."""
    p = Path(path)
    if cfg is not None and (fmt == "hub" or cfg.data_files is not None or cfg.streaming
                            or (fmt == "auto" and is_hub_name(str(path)))):
        return _read_datasets(cfg, str(path), max_rows)
    if not p.exists():
        hint = (" (a hub dataset name reads from the datasets cache: set data.format: hub)"
                if looks_like_dataset_name(str(path)) else "")
        raise DataError(f"data file not found: {path} (resolved to {p.resolve()}); check data.path{hint}")
    fmt = resolve_format(p, fmt)
    if fmt != "hf_disk" and p.is_dir():
        raise DataError(f"{path} is a directory but data.format is {fmt!r}; use 'hf_disk' or point at a file")
    if fmt == "jsonl":
        return _read_jsonl(p, max_rows)
    if fmt == "json":
        return _read_json(p, max_rows)
    if fmt == "parquet":
        return _read_parquet(p, max_rows)
    if fmt == "hf_disk":
        return _read_hf_disk(p, split, max_rows)
    raise DataError(f"unknown data.format {fmt!r}; use auto, jsonl, json, parquet or hf_disk")


# ---------------------------------------------------------------------------------------------
# Turning raw dicts into rows.


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def infer_kind(record: dict, cfg: DataConfig, source: str = "first row") -> RowKind:
    """Guess the row kind from one row's keys (TRL's conventions)."""
    keys = set(record)
    if cfg.chosen_key in keys and cfg.rejected_key in keys:
        return "preference"
    if cfg.completion_key in keys and cfg.label_key in keys:
        return "unpaired"
    if cfg.messages_key in keys or (cfg.completion_key in keys and cfg.prompt_key in keys):
        return "sft"
    if cfg.prompt_key in keys:
        return "prompt"
    raise DataError(
        f"{source}: cannot tell the row kind from its keys ({', '.join(record) or 'none'}); expected "
        f"'{cfg.prompt_key}' (prompt), '{cfg.chosen_key}'+'{cfg.rejected_key}' (preference), "
        f"'{cfg.completion_key}'+'{cfg.label_key}' (unpaired), '{cfg.prompt_key}'+'{cfg.completion_key}' "
        f"or '{cfg.messages_key}' (sft) — set data.kind and the data.*_key names to match your columns"
    )


def parse_label(value: Any, source: str, key: str = "label") -> bool:
    """A KTO-style desirability label: true/false or 1/0 (also as strings); anything else is an error."""
    if type(value).__module__ == "numpy":
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{source}: field '{key}' must be true/false or 1/0, found {_describe(value)}")


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def _role_hint(role: str) -> str:
    if role.lower() in CHAT_ROLES:
        return f" (roles are lower case: {role.lower()!r})"
    if role.lower() in _SHAREGPT_ROLES:
        return f" (ShareGPT-style data: map it to {_SHAREGPT_ROLES[role.lower()]!r})"
    close = difflib.get_close_matches(role, CHAT_ROLES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _normalize_messages(value: list, field: str, source: str) -> Messages:
    if not value:
        raise DataError(f"{source}: field '{field}' is an empty message list; it needs at least one message")
    out: Messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(
                f"{source}: field '{field}', message at index {i} is {_describe(msg)}; "
                "each message must be an object with 'role' and 'content'"
            )
        missing = [k for k in ("role", "content") if msg.get(k) is None]
        if missing:
            raise DataError(
                f"{source}: field '{field}', message at index {i} has no {' or '.join(repr(k) for k in missing)} "
                f"(message has keys: {', '.join(msg) or 'none'}); each message needs 'role' and 'content'"
            )
        if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
            bad = "role" if not isinstance(msg["role"], str) else "content"
            raise DataError(
                f"{source}: field '{field}', message at index {i}: '{bad}' must be a string, "
                f"found {_describe(msg[bad])}"
            )
        if msg["role"] not in CHAT_ROLES:
            raise DataError(
                f"{source}: field '{field}', message at index {i} has role {msg['role']!r}, which chat templates "
                f"do not know{_role_hint(msg['role'])}; roles are {', '.join(CHAT_ROLES)}"
            )
        # Parquet/Arrow structs carry every key seen in the column, as None where a message lacked it.
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _content(value: Any, field: str, source: str) -> Content:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _normalize_messages(value, field, source)
    raise DataError(
        f"{source}: field '{field}' must be a string or a list of {{role, content}} messages, "
        f"found {_describe(value)}"
    )


def _shared_prefix(chosen: Content, rejected: Content, source: str, cfg: DataConfig):
    """TRL's implicit prompt: chosen and rejected repeat the prompt; split it off as the shared prefix."""
    ck, rk, pk = cfg.chosen_key, cfg.rejected_key, cfg.prompt_key
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{source}: without '{pk}', fields '{ck}' and '{rk}' must both be strings or both be message lists"
        )
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        raise DataError(
            f"{source}: field '{pk}' is missing and '{ck}' and '{rk}' are identical or one contains the "
            f"other, so no prompt/completion split exists; add a '{pk}' field"
        )
    if isinstance(chosen, str):
        # Cut at a word boundary so the prompt never ends mid-word; whitespace goes to the completion.
        cut = n
        while cut > 0 and not chosen[cut - 1].isspace():
            cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
        n = cut
    if n == 0:
        raise DataError(
            f"{source}: field '{pk}' is missing and '{ck}' and '{rk}' share no leading "
            f"{'words' if isinstance(chosen, str) else 'messages'} to use as the prompt; add a '{pk}' field"
        )
    return chosen[:n], chosen[n:], rejected[n:]


class _RowParser:
    def __init__(self, cfg: DataConfig, kind: RowKind, why: str):
        self.cfg, self.kind, self.why = cfg, kind, why
        pk, ck, rk = cfg.prompt_key, cfg.chosen_key, cfg.rejected_key
        self.needs = {
            "prompt": f"prompt rows need '{pk}'",
            "preference": f"preference rows need '{pk}', '{ck}', '{rk}' ('{pk}' may be left out when "
            f"'{ck}' and '{rk}' both repeat it)",
            "unpaired": f"unpaired rows need '{pk}', '{cfg.completion_key}', '{cfg.label_key}'",
            "sft": f"sft rows need '{pk}' and '{cfg.completion_key}', or '{cfg.messages_key}'",
        }[kind]

    def _missing(self, record: dict, key: str, source: str, null: bool = False) -> DataError:
        setting = next(f for f in _KEY_FIELDS if getattr(self.cfg, f) == key)
        what = "is null" if null else "is missing"
        return DataError(
            f"{source}: field '{key}' {what} (row has keys: {', '.join(record) or 'none'}); {self.needs} — "
            f"set data.{setting} if your column has another name{self.why}"
        )

    def _get(self, record: dict, key: str, source: str) -> Any:
        if key not in record:
            raise self._missing(record, key, source)
        if record[key] is None:
            raise self._missing(record, key, source, null=True)
        return record[key]

    def parse(self, record: dict, source: str) -> Row:
        cfg = self.cfg
        if self.kind == "prompt":
            used = {cfg.prompt_key}
            prompt = self._prompt(record, source)
            row: Row = PromptRow(prompt=prompt, extra={}, source=source)
        elif self.kind == "preference":
            used = {cfg.prompt_key, cfg.chosen_key, cfg.rejected_key}
            chosen = _content(self._get(record, cfg.chosen_key, source), cfg.chosen_key, source)
            rejected = _content(self._get(record, cfg.rejected_key, source), cfg.rejected_key, source)
            if record.get(cfg.prompt_key) is None:
                prompt, chosen, rejected = _shared_prefix(chosen, rejected, source, cfg)
            else:
                prompt = self._prompt(record, source)
            if chosen == rejected:
                raise DataError(
                    f"{source}: fields '{cfg.chosen_key}' and '{cfg.rejected_key}' are identical, so the pair "
                    "prefers nothing (its loss cannot be lowered by learning); fix or remove the row")
            row = PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, extra={}, source=source)
        elif self.kind == "unpaired":
            used = {cfg.prompt_key, cfg.completion_key, cfg.label_key}
            prompt = self._prompt(record, source)
            completion = _content(self._get(record, cfg.completion_key, source), cfg.completion_key, source)
            label = parse_label(self._get(record, cfg.label_key, source), source, cfg.label_key)
            row = UnpairedRow(prompt=prompt, completion=completion, label=label, extra={}, source=source)
        else:
            if cfg.prompt_key not in record and cfg.messages_key in record:
                used = {cfg.messages_key}
                prompt, completion = self._split_messages(record, source)
            else:
                used = {cfg.prompt_key, cfg.completion_key}
                prompt = self._prompt(record, source)
                completion = _content(
                    self._get(record, cfg.completion_key, source), cfg.completion_key, source
                )
            row = SFTRow(prompt=prompt, completion=completion, extra={}, source=source)
        row.extra = {k: v for k, v in record.items() if k not in used}
        return row

    def _prompt(self, record: dict, source: str) -> Content:
        key = self.cfg.prompt_key
        prompt = _content(self._get(record, key, source), key, source)
        if isinstance(prompt, str) and not prompt.strip():
            raise DataError(f"{source}: field '{key}' is an empty string; every row needs a prompt")
        return prompt

    def _split_messages(self, record: dict, source: str) -> tuple[Messages, Messages]:
        key = self.cfg.messages_key
        value = self._get(record, key, source)
        if not isinstance(value, list):
            raise DataError(
                f"{source}: field '{key}' must be a list of {{role, content}} messages, "
                f"found {_describe(value)}"
            )
        messages = _normalize_messages(value, key, source)
        last = messages[-1]["role"]
        if last != "assistant":
            raise DataError(
                f"{source}: field '{key}' ends with a '{last}' message; sft conversations must end with "
                "the assistant turn to learn"
            )
        if len(messages) < 2:
            raise DataError(
                f"{source}: field '{key}' has only the assistant turn; it needs a prompt turn before it"
            )
        return messages[:-1], messages[-1:]


def _load(cfg: DataConfig, path: str, kind: RowKind | None) -> tuple[list[Row], RowKind]:
    if kind is not None and kind not in _ROW_KINDS:
        raise ValueError(f"kind must be one of {_ROW_KINDS}, got {kind!r}")
    if kind is not None and cfg.kind not in ("auto", kind):
        raise DataError(
            f"data.kind is '{cfg.kind}' but this trainer needs '{kind}' rows; "
            f"set data.kind to '{kind}' or 'auto'"
        )
    records = read_records(path, cfg.format, cfg.split, cfg.max_rows, cfg)
    parser: _RowParser | None = None
    rows: list[Row] = []
    for source, record in records:
        if parser is None:
            if kind is not None:
                parser = _RowParser(cfg, kind, f" (this trainer reads '{kind}' rows)")
            elif cfg.kind != "auto":
                parser = _RowParser(cfg, cfg.kind, f" (data.kind is '{cfg.kind}')")
            else:
                inferred = infer_kind(record, cfg, source)
                parser = _RowParser(
                    cfg, inferred, f" (data.kind is 'auto' and the first row's keys made it '{inferred}')"
                )
        rows.append(parser.parse(record, source))
    if parser is None:
        raise DataError(
            f"{path}: no rows found (empty file, only blank lines, or an empty list); check data.path"
        )
    return rows, parser.kind


def load_rows(cfg: DataConfig, kind: RowKind | None = None) -> list[Row]:
    """All rows of `cfg.path` (first `cfg.max_rows`), normalized; `kind` is what the trainer needs."""
    return _load(cfg, cfg.path, kind)[0]


def split_eval(rows: Sequence[Row], fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Hold out a seeded random `fraction` of rows (at least one) for evaluation; keeps file order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(rows), []
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(
            f"data.eval_fraction={fraction} of {len(rows)} rows leaves no training rows; lower it or add rows"
        )
    picked = set(random.Random(f"fleetrl-eval:{seed}").sample(range(len(rows)), n_eval))
    train = [r for i, r in enumerate(rows) if i not in picked]
    held = [r for i, r in enumerate(rows) if i in picked]
    return train, held


def load_train_eval(cfg: DataConfig, kind: RowKind | None = None) -> tuple[list[Row], list[Row]]:
    """Training rows and held-out rows: from `cfg.eval_path`, or a seeded `cfg.eval_fraction` split."""
    rows, found = _load(cfg, cfg.path, kind)
    if cfg.eval_path is not None:
        # The eval file must hold the same kind of rows as the training file.
        return rows, _load(cfg, cfg.eval_path, found)[0]
    return split_eval(rows, cfg.eval_fraction, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Rendering rows to model text. Tokenizers are duck-typed: anything with `chat_template` and
# `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.


def has_chat_template(tokenizer: Any) -> bool:
    return (
        tokenizer is not None
        and bool(getattr(tokenizer, "chat_template", None))
        and callable(getattr(tokenizer, "apply_chat_template", None))
    )


def _template(tokenizer: Any, messages: Messages, add_generation_prompt: bool, source: str) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(
            f"{source}: tokenizer.apply_chat_template(..., tokenize=False) returned "
            f"{type(text).__name__}, expected str"
        )
    return text


def _no_template_error(source: str, field: str, apply_chat_template: bool) -> DataError:
    reason = (
        "data.apply_chat_template is false"
        if not apply_chat_template
        else "the tokenizer has no chat template"
    )
    return DataError(
        f"{source}: field '{field}' is a message list but {reason}, so it cannot be turned into text; "
        "give the tokenizer a chat template (and set data.apply_chat_template=true) or write the field as a string"
    )


def _parts(row_or_prompt: Any) -> tuple[Content, str]:
    if isinstance(row_or_prompt, str | list):
        return row_or_prompt, "<prompt>"
    return row_or_prompt.prompt, row_or_prompt.source


def render_prompt(
    row_or_prompt: Row | Content, tokenizer: Any = None, apply_chat_template: bool = True
) -> str:
    """The text the model continues: the chat template with the generation prompt, or the plain string."""
    prompt, source = _parts(row_or_prompt)
    use_template = apply_chat_template and has_chat_template(tokenizer)
    if isinstance(prompt, list):
        if not use_template:
            raise _no_template_error(source, "prompt", apply_chat_template)
        return _template(tokenizer, prompt, True, source)
    if use_template:
        return _template(tokenizer, [{"role": "user", "content": prompt}], True, source)
    return prompt


def render_completion(
    row: PreferenceRow | UnpairedRow | SFTRow,
    tokenizer: Any = None,
    which: Literal["completion", "chosen", "rejected"] = "completion",
    apply_chat_template: bool = True,
    add_eos: bool = True,
) -> str:
    """The text that follows `render_prompt(row)` in a training sequence, end-of-turn included.

    With a chat template, the completion is rendered as the assistant turn(s) after the prompt and cut
    out of the full conversation, so it ends with the template's end-of-turn marker. Without one it is
    the plain string plus the tokenizer's eos_token (when `add_eos` and the tokenizer has one).
    """
    if isinstance(row, PreferenceRow) and which == "completion":
        raise ValueError(
            "preference rows have 'chosen' and 'rejected'; pass which='chosen' or which='rejected'"
        )
    if not hasattr(row, which):
        raise ValueError(f"{type(row).__name__} has no field {which!r}")
    completion: Content = getattr(row, which)
    use_template = apply_chat_template and has_chat_template(tokenizer)
    if not use_template:
        if isinstance(completion, list):
            raise _no_template_error(row.source, which, apply_chat_template)
        eos = getattr(tokenizer, "eos_token", None) if add_eos else None
        return completion + eos if isinstance(eos, str) else completion
    prompt = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    head = _template(tokenizer, prompt, True, row.source)
    full = _template(tokenizer, prompt + turns, False, row.source)
    if not full.startswith(head):
        raise DataError(
            f"{row.source}: the chat template renders the prompt differently once '{which}' follows it, so "
            "the completion text cannot be cut out; use a template that keeps earlier turns unchanged, or "
            "set data.apply_chat_template=false with plain-string fields"
        )
    return full[len(head) :]


# ---------------------------------------------------------------------------------------------
# Streaming prompts over epochs.


class PromptStream:
    """Endless iterator over `rows`, epoch after epoch, yielding (epoch, row_index, row).

    Each epoch visits every row once, in an order seeded by (seed, epoch), so a run is reproducible
    and `state_dict()` / `load_state_dict()` resume exactly where a checkpoint stopped.
    """

    def __init__(self, rows: Sequence[Row], seed: int = 0, shuffle: bool = True):
        if len(rows) == 0:
            raise DataError("PromptStream got no rows; check data.path and data.max_rows")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # rows already yielded in the current epoch
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`: identical across processes and runs.
            random.Random(f"fleetrl-stream:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> tuple[int, int, Row]:
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._order_for(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return self.epoch, index, self.rows[index]

    def take(self, n: int) -> list[tuple[int, int, Row]]:
        """The next `n` items (a batch of prompts)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "num_rows"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the prompt stream: the checkpoint has {key}={state.get(key)!r} but this run "
                    f"has {key}={mine!r}; resume with the same data and data.seed/data.shuffle/data.max_rows"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self.rows):
            raise DataError(
                f"cannot resume the prompt stream: position {position} is outside 0..{len(self.rows)}"
            )
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = self._order_for(self.epoch)
