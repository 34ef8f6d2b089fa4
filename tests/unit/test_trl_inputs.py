"""Inputs written for TRL: reward functions in its signature, datasets through datasets.load_dataset,
and the math_verify-based built-in reward."""

import json
import textwrap

import pytest

from fleetrl.data.rows import DataConfig, DataError, load_rows
from fleetrl.reward.builtins import make_builtin
from fleetrl.reward.rules import load_rule_function
from fleetrl.reward.scorer import RewardError, RewardScorer

TRL_RULES = textwrap.dedent('''\
    def accuracy_reward(completions, solution, **kwargs):
        # TRL's shape: conversational completions are message lists, others strings
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [None if s is None else float(t.strip() == s) for t, s in zip(texts, solution)]

    def seen(completions, prompts, **kwargs):
        return [float(isinstance(p, list) and isinstance(c, list) and c[0]["role"] == "assistant")
                for p, c in zip(prompts, completions)]

    def only_completions(completions):
        return [float(len(c)) for c in completions]

    def flaky(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch")
        if completions[0] == "bad":
            raise ValueError("bad sample")
        return [1.0]

    def fleet(prompts, completions, solution):
        return [float(c == s) for c, s in zip(completions, solution)]
    ''')


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "trl_rules.py").write_text(TRL_RULES)
    return tmp_path


def scorer(rules, *functions, on_error="fail"):
    return RewardScorer({"on_error": on_error, "functions": [
        {"name": name, "kind": "rule", "path": f"trl_rules.py:{name}", "weight": w} for name, w in functions]},
        base_dir=rules)


def test_trl_style_is_detected_by_its_first_parameter(rules):
    assert load_rule_function("trl_rules.py:accuracy_reward", rules).trl_style
    assert load_rule_function("trl_rules.py:only_completions", rules).trl_style
    fleet = load_rule_function("trl_rules.py:fleet", rules)
    assert not fleet.trl_style and fleet.required_columns() == {"solution"}
    assert load_rule_function("trl_rules.py:accuracy_reward", rules).required_columns() == {"solution"}


def test_trl_function_on_plain_text_rows(rules):
    result = scorer(rules, ("accuracy_reward", 1.0), ("only_completions", 0.5)).score(
        ["p1", "p2"], ["4", "5"], {"solution": ["4", "6"]})
    assert result.per_function["accuracy_reward"] == [1.0, 0.0]
    assert result.rewards == [1.0 + 0.5, 0.0 + 0.5]


def test_trl_function_gets_message_lists_for_conversational_rows(rules):
    raw = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]]
    result = scorer(rules, ("seen", 1.0), ("accuracy_reward", 1.0)).score(
        ["<rendered 1>", "<rendered 2>"], ["4", "5"], {"solution": ["4", "6"]}, raw)
    assert result.per_function["seen"] == [1.0, 1.0]
    assert result.per_function["accuracy_reward"] == [1.0, 0.0]


def test_none_leaves_the_value_out_and_is_counted(rules):
    result = scorer(rules, ("accuracy_reward", 1.0), ("only_completions", 1.0)).score(
        ["a", "b", "c"], ["4", "xy", "z"], {"solution": ["4", None, "q"]})
    assert result.skipped == {"accuracy_reward": 1}
    assert result.errors == []
    assert result.rewards == [2.0, 2.0, 1.0]  # sample 1: only the second function counts


def test_none_from_a_fleetrl_function_stays_an_error(rules):
    (rules / "fl.py").write_text("def f(prompts, completions, **c):\n    return [None for _ in completions]\n")
    s = RewardScorer({"functions": [{"name": "f", "kind": "rule", "path": "fl.py:f"}]}, base_dir=rules)
    with pytest.raises(RewardError, match="returned None"):
        s.score(["a"], ["b"])


def test_a_failing_trl_function_is_rerun_one_sample_at_a_time_with_its_raw_prompts(rules):
    result = scorer(rules, ("flaky", 1.0), on_error="zero").score(["a", "b"], ["ok", "bad"], {}, ["pa", "pb"])
    assert result.per_function["flaky"] == [1.0, 0.0]
    assert len(result.errors) == 1 and "bad sample" in result.errors[0].message


# --- math_answer -------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,answer,expected", [
    (r"So the answer is \boxed{42}.", "Natalia sold 48/2 = 24 clips in May. #### 42", 1.0),  # GSM8K solution
    ("She has 41 left.", "#### 42", 0.0),
    (r"\boxed{\frac{1}{2}}", r"\frac12", 1.0),  # bare LaTeX reference
    (r"\boxed{0.5}", r"so the result is $\boxed{\frac{1}{2}}$", 1.0),  # MATH solution
    ("Reasoning... #### 1,234", "1234", 1.0),  # GSM8K-style completion
    (r"\boxed{x^2+2x+1}", r"(x+1)^2", 1.0),
    ("no answer here", "3", 0.0),
    ("7", 7, 1.0),  # a numeric column
])
def test_math_answer(completion, answer, expected):
    assert make_builtin("math_answer")([""], [completion], answer=[answer]) == [expected]


def test_math_answer_errors_name_the_column_and_the_reference():
    with pytest.raises(ValueError, match=r"builtin math_answer reads the data column 'answer'.*kwargs.answer_key"):
        make_builtin("math_answer")([""], ["1"], solution=["1"])
    with pytest.raises(ValueError, match="holds no answer math_verify can read"):
        make_builtin("math_answer", {"answer_key": "solution"})([""], ["1"], solution=["no answer after ####"])
    with pytest.raises(ValueError, match=r"has no option\(s\) \['tolerance'\]"):
        make_builtin("math_answer", {"tolerance": 1})


def test_math_answer_runs_in_the_scorers_worker_thread():
    # math_verify's own timeouts use signals (main thread only); the built-in turns them off.
    s = RewardScorer({"functions": [{"name": "m", "kind": "builtin", "builtin": "math_answer"}]})
    assert s.score(["q"], [r"\boxed{3}"], {"answer": ["#### 3"]}).rewards == [1.0]


# --- datasets.load_dataset ---------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    for name, rows in {"a.jsonl": [("a", "1"), ("b", "2")], "b.jsonl": [("c", "3")]}.items():
        (tmp_path / name).write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n" for p, s in rows))
    return tmp_path


def test_several_data_files_one_dataset(files):
    rows = load_rows(DataConfig(path="json", data_files=[str(files / "a.jsonl"), str(files / "b.jsonl")]))
    assert [(r.prompt, r.extra) for r in rows] == [("a", {"solution": "1"}), ("b", {"solution": "2"}),
                                                   ("c", {"solution": "3"})]
    assert rows[0].source.endswith("[train] row 1")


def test_streaming_and_split_slices(files):
    rows = load_rows(DataConfig(path="json", data_files=str(files / "*.jsonl"), streaming=True, max_rows=2))
    assert [r.prompt for r in rows] == ["a", "b"]
    # A directory of data files read like a hub dataset repository, with a split slice.
    rows = load_rows(DataConfig(path=str(files), format="hub", split="train[:1]"))
    assert len(rows) == 1


def test_row_checks_apply_on_top(files):
    (files / "bad.jsonl").write_text('{"prompt": "x"}\n{"question": "y"}\n')
    with pytest.raises(DataError, match=r"row 2: field 'prompt' is null|row 2: field 'prompt' is missing"):
        load_rows(DataConfig(path="json", data_files=str(files / "bad.jsonl")), kind="prompt")


def test_a_hub_name_not_found_gets_a_hint_not_file_not_found(monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        load_rows(DataConfig(path="nobody/no-such-dataset", name="main"))
    text = str(e.value)
    assert "data.path 'nobody/no-such-dataset': dataset not found" in text
    assert "HF_HUB_OFFLINE is set" in text and "local .jsonl/.json/.parquet file" in text
    assert "data file not found" not in text
