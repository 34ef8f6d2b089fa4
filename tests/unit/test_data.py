"""Unit tests for orchestrator/data.py: formats, row kinds, errors, chat templates, prompt stream."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetrl.data.rows import (
    DataConfig,
    DataError,
    PreferenceRow,
    PromptRow,
    PromptStream,
    SFTRow,
    UnpairedRow,
    load_rows,
    load_train_eval,
    parse_label,
    render_completion,
    render_prompt,
    split_eval,
)

USER = [{"role": "user", "content": "What is 2+2?"}]
SYS_USER = [{"role": "system", "content": "Be brief."}] + USER


def asst(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows, blank_after_first=False) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first and lines:
        lines.insert(1, "   ")
    path.write_text("\n".join(lines) + "\n\n")
    return path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def error_of(config, kind=None) -> str:
    with pytest.raises(DataError) as exc:
        load_rows(config, kind)
    return str(exc.value)


# --------------------------------------------------------------------------------------------- formats


def test_jsonl_prompt_rows_skip_blank_lines_and_keep_line_numbers(tmp_path):
    p = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}],
        blank_after_first=True,
    )
    rows = load_rows(cfg(p))
    assert [type(r) for r in rows] == [PromptRow, PromptRow]
    assert [r.prompt_text for r in rows] == ["a", "b"]
    assert rows[0].prompt_messages is None
    assert [r.extra for r in rows] == [{"answer": "1"}, {"answer": "2"}]
    # line 2 is blank, so the second row is line 3
    assert [r.source for r in rows] == [f"{p}:1", f"{p}:3"]


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_and_data_wrapper(tmp_path, wrapped):
    items = [{"prompt": "a", "id": 7}, {"prompt": "b", "id": 8}]
    p = tmp_path / "train.json"
    p.write_text(json.dumps({"data": items} if wrapped else items, indent=2))
    rows = load_rows(cfg(p))
    assert [(r.prompt, r.extra) for r in rows] == [("a", {"id": 7}), ("b", {"id": 8})]
    assert rows[1].source == f"{p} row 2"


def test_parquet_conversational_preference(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "pref.parquet"
    table = pa.Table.from_pylist(
        [
            {"prompt": USER, "chosen": asst("4"), "rejected": asst("5"), "score": 1.5},
            {"prompt": USER, "chosen": asst("four"), "rejected": asst("five"), "score": None},
        ]
    )
    pq.write_table(table, p)
    rows = load_rows(cfg(p))
    assert all(isinstance(r, PreferenceRow) for r in rows)
    assert rows[0].prompt_messages == USER and rows[0].prompt_text is None
    assert rows[0].chosen_messages == asst("4") and rows[0].rejected_messages == asst("5")
    assert rows[1].chosen == asst("four")
    assert [r.extra for r in rows] == [{"score": 1.5}, {"score": None}]
    assert rows[1].source == f"{p} row 2"


def test_parquet_drops_null_struct_keys_from_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow gives every message all keys seen in the column ("name" here), None where absent.
    p = tmp_path / "p.parquet"
    prompt = [{"role": "system", "content": "s", "name": "sys"}, {"role": "user", "content": "q"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": prompt}]), p)
    (row,) = load_rows(cfg(p))
    assert row.prompt == [{"role": "system", "content": "s", "name": "sys"}, {"role": "user", "content": "q"}]


def test_datasets_dir_dataset_and_datasetdict_split(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": "a", "answer": "x"}]).save_to_disk(str(single))
    (row,) = load_rows(cfg(single))
    assert (row.prompt, row.extra, row.source) == ("a", {"answer": "x"}, f"{single} row 1")

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "t1"}, {"prompt": "t2"}]),
            "test": datasets.Dataset.from_list([{"prompt": "e1"}]),
        }
    ).save_to_disk(str(both))
    assert [r.prompt for r in load_rows(cfg(both))] == ["t1", "t2"]
    rows = load_rows(cfg(both, split="test", format="hf_disk"))
    assert [r.prompt for r in rows] == ["e1"] and rows[0].source == f"{both}[test] row 1"

    msg = error_of(cfg(both, split="validation"))
    assert "'validation' not found" in msg and "train" in msg and "test" in msg and "data.split" in msg


def test_not_a_datasets_dir(tmp_path):
    d = tmp_path / "plain_dir"
    d.mkdir()
    msg = error_of(cfg(d))
    assert str(d) in msg and "save_to_disk" in msg


def test_format_errors(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("prompt\nhi\n")
    msg = error_of(cfg(p))
    assert "train.csv" in msg and "'.csv'" in msg and "data.format" in msg

    # An explicit format wins over the suffix.
    q = write_jsonl(tmp_path / "rows.txt", [{"prompt": "hi"}])
    assert load_rows(cfg(q, format="jsonl"))[0].prompt == "hi"

    d = tmp_path / "dir"
    d.mkdir()
    assert "directory" in error_of(cfg(d, format="jsonl"))


def test_max_rows(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": str(i)} for i in range(10)] + [{"bad": 1}])
    # The broken last row lies beyond max_rows, so it is never parsed.
    assert [r.prompt for r in load_rows(cfg(p, max_rows=3))] == ["0", "1", "2"]


# --------------------------------------------------------------------------------------------- row kinds


@pytest.mark.parametrize("conversational", [False, True])
def test_each_kind_plain_and_conversational(tmp_path, conversational):
    prompt = USER if conversational else "What is 2+2?"

    def comp(text):
        return asst(text) if conversational else text

    p = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": prompt, "chosen": comp("4"), "rejected": comp("5")}])
    (pref,) = load_rows(cfg(p))
    assert isinstance(pref, PreferenceRow)
    assert (pref.prompt, pref.chosen, pref.rejected) == (prompt, comp("4"), comp("5"))
    assert pref.is_conversational is conversational

    p = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": prompt, "completion": comp("4"), "label": True}])
    (kto,) = load_rows(cfg(p))
    assert isinstance(kto, UnpairedRow) and kto.label is True and kto.completion == comp("4")
    assert (kto.completion_text is None) is conversational

    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": prompt, "completion": comp("4")}])
    (sft,) = load_rows(cfg(p))
    assert isinstance(sft, SFTRow) and (sft.prompt, sft.completion) == (prompt, comp("4"))

    p = write_jsonl(tmp_path / "prompt.jsonl", [{"prompt": prompt}])
    (only,) = load_rows(cfg(p))
    assert isinstance(only, PromptRow) and only.prompt == prompt


def test_sft_messages_last_assistant_turn_is_completion(tmp_path):
    conv = SYS_USER + asst("4") + [{"role": "user", "content": "and 3+3?"}] + asst("6")
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv, "topic": "math"}])
    (row,) = load_rows(cfg(p))
    assert isinstance(row, SFTRow)
    assert row.prompt == conv[:-1] and row.completion == asst("6") and row.extra == {"topic": "math"}


def test_sft_messages_must_end_with_assistant(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": SYS_USER + asst("4")}, {"messages": SYS_USER}])
    msg = error_of(cfg(p))
    assert f"{p}:2" in msg and "'messages'" in msg and "'user'" in msg and "assistant" in msg


def test_explicit_kind_overrides_inference_and_keeps_other_columns_as_extra(tmp_path):
    p = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    (row,) = load_rows(cfg(p), kind="prompt")
    assert isinstance(row, PromptRow) and row.extra == {"chosen": "a", "rejected": "b"}
    (row,) = load_rows(cfg(p, kind="prompt"))
    assert isinstance(row, PromptRow)


def test_kind_conflict_between_config_and_trainer(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": "a"}])
    msg = error_of(cfg(p, kind="sft"), kind="preference")
    assert "data.kind is 'sft'" in msg and "'preference'" in msg


def test_custom_key_names(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "good": "a", "bad": "b", "id": 3}])
    config = cfg(p, prompt_key="question", chosen_key="good", rejected_key="bad")
    (row,) = load_rows(config)
    assert isinstance(row, PreferenceRow)
    assert (row.prompt, row.chosen, row.rejected, row.extra) == ("q", "a", "b", {"id": 3})

    p = write_jsonl(tmp_path / "k.jsonl", [{"q": "x", "out": "y", "ok": 0}])
    (row,) = load_rows(cfg(p, prompt_key="q", completion_key="out", label_key="ok"))
    assert isinstance(row, UnpairedRow) and row.label is False and row.completion == "y"

    p = write_jsonl(tmp_path / "c.jsonl", [{"conversation": USER + asst("4")}])
    (row,) = load_rows(cfg(p, messages_key="conversation"))
    assert isinstance(row, SFTRow) and row.completion == asst("4")


def test_implicit_prompt_conversational(tmp_path):
    chosen = SYS_USER + asst("4")
    rejected = SYS_USER + asst("5")
    p = write_jsonl(tmp_path / "t.jsonl", [{"chosen": chosen, "rejected": rejected, "answer": "4"}])
    (row,) = load_rows(cfg(p))
    assert isinstance(row, PreferenceRow)
    assert row.prompt == SYS_USER and row.chosen == asst("4") and row.rejected == asst("5")
    assert row.extra == {"answer": "4"}


def test_implicit_prompt_plain_strings_cut_at_word_boundary(tmp_path):
    p = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"chosen": "Q: 2+2?\nA: four", "rejected": "Q: 2+2?\nA: five"},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        ],
    )
    a, b = load_rows(cfg(p))
    assert (a.prompt, a.chosen, a.rejected) == ("Q: 2+2?\nA:", " four", " five")
    assert (b.prompt, b.chosen, b.rejected) == ("The sky is", " blue.", " green.")


@pytest.mark.parametrize(
    "chosen,rejected,expect",
    [
        (USER + asst("4"), USER + asst("4"), "identical"),
        (asst("4"), asst("5"), "share no leading messages"),
        ("blue", "bland", "share no leading words"),
        (USER + asst("4"), "text", "both be strings or both be message lists"),
    ],
)
def test_implicit_prompt_errors(tmp_path, chosen, rejected, expect):
    p = write_jsonl(tmp_path / "t.jsonl", [{"chosen": chosen, "rejected": rejected}])
    msg = error_of(cfg(p))
    assert f"{p}:1" in msg and expect in msg and "'prompt'" in msg


# --------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "value,expect",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("False", False),
        ("1", True),
        ("0", False),
    ],
)
def test_label_accepts(value, expect):
    assert parse_label(value, "f.jsonl:1") is expect


@pytest.mark.parametrize("value", [2, -1, 0.5, "yes", "", [1]])
def test_label_rejects(tmp_path, value):
    p = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "a", "label": value},
        ],
    )
    msg = error_of(cfg(p))
    assert f"{p}:2" in msg and "'label'" in msg and "true/false or 1/0" in msg and repr(value) in msg


def test_label_numpy_bool():
    np = pytest.importorskip("numpy")
    assert parse_label(np.bool_(True), "x") is True and parse_label(np.int64(0), "x") is False


# --------------------------------------------------------------------------------------------- errors


def test_missing_field_message_names_file_line_field_keys_and_fix(tmp_path):
    p = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 16
        + [{"prompt": "q", "answer": "4", "rejected": "b"}],
    )
    msg = error_of(cfg(p))
    assert msg.startswith(f"{p}:17: field 'chosen' is missing (row has keys: prompt, answer, rejected)")
    assert "preference rows need 'prompt', 'chosen', 'rejected'" in msg
    assert "set data.chosen_key" in msg
    assert "inferred" in msg or "first row's keys made it 'preference'" in msg


def test_missing_field_uses_custom_key_in_message(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"q": "x", "completion": "y"}])
    msg = error_of(cfg(p, prompt_key="query", kind="sft"))
    assert (
        "field 'query' is missing" in msg and "set data.prompt_key" in msg and "(data.kind is 'sft')" in msg
    )


def test_trainer_kind_is_named_in_errors(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    msg = error_of(cfg(p), kind="prompt")
    assert "field 'prompt' is missing" in msg and "this trainer reads 'prompt' rows" in msg


def test_null_field(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "completion": None, "label": 1}])
    msg = error_of(cfg(p))
    assert f"{p}:1" in msg and "field 'completion' is null" in msg


def test_wrong_type_field(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "chosen": 5, "rejected": "b"}])
    msg = error_of(cfg(p))
    assert f"{p}:1" in msg and "'chosen'" in msg and "int 5" in msg and "string or a list" in msg


def test_empty_prompt_string(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "  "}])
    assert "empty string" in error_of(cfg(p))


@pytest.mark.parametrize(
    "message,expect",
    [
        ({"role": "user", "text": "hi"}, "has no 'content' (message has keys: role, text)"),
        ({"content": "hi"}, "has no 'role'"),
        ("hello", "each message must be an object"),
        ({"role": "user", "content": ["part"]}, "'content' must be a string"),
    ],
)
def test_bad_message_shape_names_the_index(tmp_path, message, expect):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": [{"role": "system", "content": "s"}, message]}])
    msg = error_of(cfg(p))
    assert f"{p}:1" in msg and "field 'prompt'" in msg and "index 1" in msg and expect in msg


def test_empty_message_list(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"prompt": []}])
    assert "empty message list" in error_of(cfg(p))


def test_bad_json_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b",}\n')
    msg = error_of(cfg(p))
    assert f"{p}:3: invalid JSON" in msg


def test_non_object_jsonl_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a"}\n["prompt", "b"]\n')
    msg = error_of(cfg(p))
    assert f"{p}:2" in msg and "expected a JSON object" in msg and "list" in msg


def test_json_file_that_is_really_jsonl(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    msg = error_of(cfg(p))
    assert f"{p}:2" in msg and "JSON Lines" in msg and "format='jsonl'" in msg


def test_json_wrong_top_level(tmp_path):
    p = tmp_path / "train.json"
    p.write_text('{"rows": []}')
    assert "expected a JSON list" in error_of(cfg(p))


def test_missing_file(tmp_path):
    p = tmp_path / "nope" / "train.jsonl"
    msg = error_of(cfg(p))
    assert "not found" in msg and str(p) in msg and "data.path" in msg


@pytest.mark.parametrize("name,text", [("e.jsonl", "\n\n  \n"), ("e.jsonl", ""), ("e.json", "[]")])
def test_empty_dataset(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    msg = error_of(cfg(p))
    assert str(p) in msg and "no rows" in msg


def test_unknown_kind_keys(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "score": 1}])
    msg = error_of(cfg(p))
    assert f"{p}:1" in msg and "text, score" in msg and "data.kind" in msg


# --------------------------------------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ValidationError):
        DataConfig(path="x.jsonl", bogus=1)
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(path="x.jsonl", eval_path="y.jsonl", eval_fraction=0.1)
    with pytest.raises(ValidationError, match="used twice"):
        DataConfig(path="x.jsonl", prompt_key="text", completion_key="text")
    with pytest.raises(ValidationError):
        DataConfig(path="x.jsonl", eval_fraction=1.0)
    with pytest.raises(ValidationError):
        DataConfig(path="x.jsonl", format="csv")


# --------------------------------------------------------------------------------------------- eval split


def test_split_eval_is_seeded_disjoint_and_ordered(tmp_path):
    rows = [PromptRow(prompt=str(i), extra={}, source=f"f:{i}") for i in range(20)]
    train, held = split_eval(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert {r.prompt for r in train} | {r.prompt for r in held} == {str(i) for i in range(20)}
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert [int(r.prompt) for r in held] == sorted(int(r.prompt) for r in held)
    assert split_eval(rows, 0.25, seed=3) == (train, held)
    assert split_eval(rows, 0.25, seed=4)[1] != held
    assert split_eval(rows, 0.0) == (rows, [])
    assert len(split_eval(rows, 0.01)[1]) == 1  # a non-zero fraction holds out at least one row
    with pytest.raises(DataError, match="no training rows"):
        split_eval(rows[:1], 0.5)


def test_load_train_eval_from_fraction_and_from_path(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [{"prompt": str(i)} for i in range(10)])
    train, held = load_train_eval(cfg(p, eval_fraction=0.2, seed=1))
    assert len(train) == 8 and len(held) == 2

    e = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "chosen": "x", "rejected": "y"}])
    train, held = load_train_eval(cfg(p, eval_path=str(e)))
    assert len(train) == 10
    # The eval file is read as the training file's kind ('prompt'); the other columns become extra.
    assert isinstance(held[0], PromptRow) and held[0].extra == {"chosen": "x", "rejected": "y"}


# --------------------------------------------------------------------------------------------- chat templates


class FakeChatTokenizer:
    """Duck-typed tokenizer: `<role>content</>` per message, `<assistant>` as the generation prompt."""

    chat_template = "fake"
    eos_token = "</s>"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class PlainTokenizer:
    chat_template = None
    eos_token = "</s>"


def test_render_prompt_with_template():
    tok = FakeChatTokenizer()
    row = PromptRow(prompt=SYS_USER, extra={}, source="f:1")
    assert render_prompt(row, tok) == "<system>Be brief.</><user>What is 2+2?</><assistant>"
    # Plain strings are wrapped as one user turn when the tokenizer has a template ...
    assert render_prompt("hi", tok) == "<user>hi</><assistant>"
    # ... and left alone when templating is off or absent.
    assert render_prompt("hi", tok, apply_chat_template=False) == "hi"
    assert render_prompt("hi", PlainTokenizer()) == "hi"
    assert render_prompt("hi", None) == "hi"


def test_render_prompt_messages_without_template_errors():
    row = PromptRow(prompt=USER, extra={}, source="data/t.jsonl:4")
    with pytest.raises(
        DataError, match=r"data/t.jsonl:4: field 'prompt' is a message list but the tokenizer"
    ):
        render_prompt(row, PlainTokenizer())
    with pytest.raises(DataError, match="apply_chat_template is false"):
        render_prompt(row, FakeChatTokenizer(), apply_chat_template=False)


def test_render_completion_templated_and_plain():
    tok = FakeChatTokenizer()
    sft = SFTRow(prompt=USER, completion=asst("4"), extra={}, source="f:1")
    assert render_completion(sft, tok) == "4</>"
    # prompt + completion is exactly the rendered conversation (what the learner trains on)
    full = tok.apply_chat_template(USER + asst("4"), tokenize=False)
    assert render_prompt(sft, tok) + render_completion(sft, tok) == full

    pref = PreferenceRow(prompt="q", chosen="yes", rejected="no", extra={}, source="f:2")
    assert render_completion(pref, tok, which="chosen") == "yes</>"
    assert render_completion(pref, PlainTokenizer(), which="rejected") == "no</s>"
    assert render_completion(pref, PlainTokenizer(), which="rejected", add_eos=False) == "no"
    assert render_completion(pref, None, which="chosen") == "yes"
    with pytest.raises(ValueError, match="which='chosen'"):
        render_completion(pref, tok)
    with pytest.raises(ValueError, match="SFTRow has no field 'chosen'"):
        render_completion(sft, tok, which="chosen")
    with pytest.raises(DataError, match="field 'completion' is a message list"):
        render_completion(sft, PlainTokenizer())


def test_render_completion_rejects_template_that_rewrites_the_prompt():
    class Rewriting(FakeChatTokenizer):
        def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
            # Renders the last user turn differently once an answer follows (like templates that drop
            # reasoning from earlier turns): the prompt is not a prefix of the full conversation.
            return f"{len(messages)}" + super().apply_chat_template(messages, tokenize, add_generation_prompt)

    sft = SFTRow(prompt=USER, completion=asst("4"), extra={}, source="f:9")
    with pytest.raises(DataError, match="f:9: the chat template renders the prompt differently"):
        render_completion(sft, Rewriting())


def test_real_tokenizer_chat_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "4", "hi"])
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = SFTRow(prompt=[{"role": "user", "content": "hi"}], completion=asst("4"), extra={}, source="f:1")
    assert render_prompt(row, tok) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_completion(row, tok) == "4<|im_end|>\n"
    plain = SFTRow(prompt="hi", completion="4", extra={}, source="f:2")
    assert render_prompt(plain, tok) == render_prompt(row, tok)
    assert render_completion(plain, tok) == "4<|im_end|>\n"
    assert render_completion(plain, tok, apply_chat_template=False) == "4<|im_end|>"


# --------------------------------------------------------------------------------------------- stream


def make_rows(n):
    return [PromptRow(prompt=f"p{i}", extra={}, source=f"f:{i + 1}") for i in range(n)]


def test_stream_epochs_cover_every_row_and_reshuffle():
    rows = make_rows(8)
    stream = PromptStream(rows, seed=5)
    first = stream.take(8)
    second = stream.take(8)
    assert {e for e, _, _ in first} == {0} and {e for e, _, _ in second} == {1}
    assert sorted(i for _, i, _ in first) == list(range(8)) == sorted(i for _, i, _ in second)
    assert [i for _, i, _ in first] != [i for _, i, _ in second]
    assert all(row is rows[i] for _, i, row in first + second)


def test_stream_determinism_and_no_shuffle():
    rows = make_rows(10)
    a = [i for _, i, _ in PromptStream(rows, seed=1).take(25)]
    b = [i for _, i, _ in PromptStream(rows, seed=1).take(25)]
    c = [i for _, i, _ in PromptStream(rows, seed=2).take(25)]
    assert a == b and a != c
    assert [i for _, i, _ in PromptStream(rows, shuffle=False).take(12)] == list(range(10)) + [0, 1]


@pytest.mark.parametrize("consumed", [0, 3, 7, 14, 21])
def test_stream_state_round_trip(consumed):
    rows = make_rows(7)
    reference = PromptStream(rows, seed=9)
    expected = [(e, i) for e, i, _ in reference.take(consumed + 10)][consumed:]

    stream = PromptStream(rows, seed=9)
    stream.take(consumed)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as JSON
    resumed = PromptStream(rows, seed=9)
    resumed.load_state_dict(state)
    assert [(e, i) for e, i, _ in resumed.take(10)] == expected


def test_stream_resume_checks():
    stream = PromptStream(make_rows(4), seed=1)
    state = stream.state_dict()
    with pytest.raises(DataError, match="num_rows=4"):
        PromptStream(make_rows(5), seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        PromptStream(make_rows(4), seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="no rows"):
        PromptStream([])
