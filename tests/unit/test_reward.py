"""Unit tests of the reward service: config, built-ins, rule loading, error policies, HTTP and model
scorers."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from fleetrl.reward.builtins import extract_final_answer, first_number, make_builtin, parse_reference_number
from fleetrl.reward.config import RewardConfig
from fleetrl.reward.http_scorer import HttpScorer, HttpScorerError
from fleetrl.reward.model_scorer import RunningMeanStd
from fleetrl.reward.rules import RewardLoadError, load_rule_function
from fleetrl.reward.scorer import RewardError, RewardScorer, preview


def rule_cfg(path: str, name: str = "r", weight: float = 1.0, **kw) -> dict:
    return {"functions": [{"name": name, "kind": "rule", "path": path, "weight": weight}], **kw}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- config


def test_config_rejects_unknown_keys_and_names_the_field():
    with pytest.raises(ValidationError, match=r"functions\.0\.rule\.model_path"):
        RewardConfig(functions=[{"name": "a", "kind": "rule", "path": "f.py:g", "model_path": "x"}])
    with pytest.raises(ValidationError, match="num_worker"):
        RewardConfig(functions=[], num_worker=2)
    with pytest.raises(ValidationError, match=r"functions\.0\.model\.model_path"):
        RewardConfig(functions=[{"name": "a", "kind": "model"}])


def test_config_validation_messages():
    with pytest.raises(ValidationError, match="used twice"):
        RewardConfig(functions=[{"name": "a", "kind": "rule", "path": "f.py:g"}] * 2)
    with pytest.raises(ValidationError, match="path/to/file.py:function_name"):
        RewardConfig(functions=[{"name": "a", "kind": "rule", "path": "f.py"}])
    with pytest.raises(ValidationError, match=r"builtin\.kwargs[\s\S]*no option\(s\) \['answer'\]"):
        RewardConfig(functions=[{"name": "a", "kind": "builtin", "builtin": "exact_match",
                                 "kwargs": {"answer": 1}}])
    with pytest.raises(ValidationError, match=r"kwargs\.pattern"):
        RewardConfig(functions=[{"name": "a", "kind": "builtin", "builtin": "format_regex"}])
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        RewardConfig(functions=[{"name": "a", "kind": "builtin", "builtin": "format_regex",
                                 "kwargs": {"pattern": "("}}])
    with pytest.raises(ValidationError, match="num_gpus"):
        RewardConfig(functions=[{"name": "rm", "kind": "model", "model_path": "m", "device": "cuda"}])
    with pytest.raises(ValidationError, match=r"http\.url"):
        RewardConfig(functions=[{"name": "h", "kind": "http", "url": "judge:8000"}])
    with pytest.raises(ValidationError, match="weight"):
        RewardConfig(functions=[{"name": "a", "kind": "rule", "path": "f.py:g", "weight": float("nan")}])
    with pytest.raises(ValidationError, match="num_workers"):
        RewardConfig(num_workers=0)


def test_config_defaults():
    cfg = RewardConfig(functions=[{"name": "m", "kind": "model", "model_path": "x"}])
    f = cfg.functions[0]
    assert (f.max_length, f.batch_size, f.normalize, f.device, f.weight) == (1024, 16, False, "auto", 1.0)
    assert (cfg.on_error, cfg.num_workers, cfg.num_cpus, cfg.num_gpus) == ("fail", 1, 1.0, 0.0)
    h = RewardConfig(functions=[{"name": "h", "kind": "http", "url": "http://x:1/s"}]).functions[0]
    assert (h.timeout_s, h.max_retries, h.headers) == (30.0, 2, {})


def test_empty_config_is_valid_but_cannot_score():
    with pytest.raises(RewardLoadError, match="reward.functions is empty"):
        RewardScorer(RewardConfig())


# ---------------------------------------------------------------- built-ins


def call(name, completions, kwargs=None, **columns):
    return make_builtin(name, kwargs)([""] * len(completions), completions, **columns)


def test_exact_match():
    answers = ["Paris", "Paris", ["Rome", "Roma"]]
    assert call("exact_match", [" Paris\n", "paris", "Rome"], answer=answers) == [1.0, 0.0, 1.0]
    assert call("exact_match", ["4"], {"answer_key": "label"}, label=[4]) == [1.0]
    with pytest.raises(ValueError, match=r"column 'answer'.*columns \['label'\].*kwargs.answer_key"):
        call("exact_match", ["4"], label=["4"])


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 7", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("The total is $1,234.50\n#### $1,234.50", "#### 1234.5", 1.0),
        ("#### -5", "He lost 5 dollars.\n#### -5", 1.0),
        ("#### 5", "#### -5", 0.0),
        ("#### 42.", 42, 1.0),  # a sentence-ending period is not a decimal point
        ("#### .5", "0.5", 1.0),
        ("#### 8", "#### 7", 0.0),
        ("The answer is 7", "#### 7", 0.0),  # no marker: 0 unless require_marker is false
        ("#### 3\nwait, actually\n#### 7", "7", 1.0),  # the last marker counts
        ("####", "7", 0.0),  # marker without a number
        ("#### 1,000,000 people", "1000000", 1.0),
    ],
)
def test_numeric_answer_gsm8k(completion, answer, expected):
    assert call("numeric_answer", [completion], answer=[answer]) == [expected]


def test_numeric_answer_options_and_bad_reference():
    assert call("numeric_answer", ["so 3 then 7"], {"require_marker": False}, answer=["7"]) == [1.0]
    assert call("numeric_answer", ["no numbers"], {"require_marker": False}, answer=["7"]) == [0.0]
    assert call("numeric_answer", ["#### 7.0004"], {"tolerance": 0.001}, answer=[7]) == [1.0]
    with pytest.raises(ValueError, match="contains no number"):
        call("numeric_answer", ["#### 7"], answer=["#### seven"])
    with pytest.raises(TypeError, match="expected a number"):
        call("numeric_answer", ["#### 7"], answer=[None])


def test_number_helpers():
    assert first_number("cost: $-3.25 or 4") == -3.25
    assert first_number("1,2,3") == 1.0  # not a thousands group
    assert first_number("12,345,678.9") == 12345678.9
    assert first_number("none") is None
    assert extract_final_answer("x 5 y 6", require_marker=False) == 6.0
    assert extract_final_answer("x 5 y 6") is None
    assert parse_reference_number("solution...\n#### 1,024") == 1024.0


def test_format_regex():
    kwargs = {"pattern": r"#### \d+"}
    assert call("format_regex", ["so #### 4", "4"], kwargs) == [1.0, 0.0]
    full = {"pattern": r"(?s)<think>.*</think>\s*#### \d+", "fullmatch": True}
    completions = ["<think>a\nb</think> #### 3", "x <think></think> #### 3"]
    assert call("format_regex", completions, full) == [1.0, 0.0]


def test_letter_fraction():
    out = call("letter_fraction", ["aaab", "a a\n a", "", "   ", "bbbb", "AAAa"], letter=["a"] * 6)
    assert out == [0.75, 1.0, 0.0, 0.0, 0.0, 0.25]
    with pytest.raises(ValueError, match="one character"):
        call("letter_fraction", ["a"], letter=["ab"])


# ---------------------------------------------------------------- rule functions

RULES = """
def batched(prompts, completions, **columns):
    assert isinstance(prompts, list) and isinstance(completions, list)
    return [float(len(c)) + float(a) for c, a in zip(completions, columns["answer"])]

def named(prompts, completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]

def flaky(prompts, completions, **columns):
    out = []
    for c in completions:
        if c == "boom":
            raise ZeroDivisionError("boom in rule")
        out.append(1.0)
    return out

def weird(prompts, completions, **columns):
    table = {"nan": float("nan"), "inf": float("inf"), "none": None, "text": "1.0"}
    return [table.get(c, 2.0) for c in completions]

def short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)

def scalar(prompts, completions, **columns):
    return 1.0

def one_arg(prompts):
    return [1.0]

NOT_A_FUNCTION = 3
"""


@pytest.fixture()
def rules_dir(tmp_path):
    write(tmp_path / "cfg" / "rules.py", RULES)
    return tmp_path / "cfg"


def test_rule_function_batched_with_columns(rules_dir):
    scorer = RewardScorer(rule_cfg("rules.py:batched"), base_dir=rules_dir)
    result = scorer.score(["p1", "p2"], ["ab", "c"], {"answer": [10, 20], "other": ["x", "y"]})
    assert result.rewards == [12.0, 21.0]
    assert result.per_function == {"r": [12.0, 21.0]} and result.errors == []


def test_rule_function_with_named_columns_gets_only_those(rules_dir):
    fn = load_rule_function("rules.py:named", rules_dir)
    assert fn(["p", "p"], ["4", "5"], answer=["4", "4"], unrelated=[1, 2]) == [1.0, 0.0]


def test_rule_path_resolution(rules_dir, tmp_path, monkeypatch):
    absolute = load_rule_function(f"{rules_dir / 'rules.py'}:batched", base_dir="/nonexistent")
    assert absolute(["p"], ["abc"], answer=[1]) == [4.0]
    monkeypatch.chdir(tmp_path)  # falls back to the CWD when not under base_dir
    named = load_rule_function("cfg/rules.py:named", base_dir=tmp_path / "elsewhere")
    assert named(["p"], ["a"], answer=["a"]) == [1.0]


def test_rule_loading_errors(rules_dir):
    with pytest.raises(RewardLoadError, match=r"'missing.py:f'.*not found \(tried .*cfg/missing.py"):
        load_rule_function("missing.py:f", rules_dir)
    with pytest.raises(RewardLoadError,
                       match=r"has no function 'nope' \(functions defined there: \[.*'batched'"):
        load_rule_function("rules.py:nope", rules_dir)
    with pytest.raises(RewardLoadError, match="'NOT_A_FUNCTION'.*is a int, not a function"):
        load_rule_function("rules.py:NOT_A_FUNCTION", rules_dir)
    with pytest.raises(RewardLoadError, match=r"must take \(prompts, completions, \*\*columns\)"):
        load_rule_function("rules.py:one_arg", rules_dir)
    write(rules_dir / "bad.py", "def f(prompts, completions):\n    return [\n\ndef g(:\n")
    with pytest.raises(RewardLoadError, match=r"'bad.py:f': syntax error in .*bad.py line \d"):
        load_rule_function("bad.py:f", rules_dir)
    write(rules_dir / "imports.py", "x = 1\nimport not_a_module_fleetrl\n")
    with pytest.raises(RewardLoadError, match=r"importing .*imports.py raised ModuleNotFoundError line 2"):
        load_rule_function("imports.py:f", rules_dir)


def test_scorer_names_the_function_that_does_not_load(rules_dir):
    with pytest.raises(RewardLoadError, match=r"reward function 'acc' \(rule\).*no function 'nope'"):
        RewardScorer(rule_cfg("rules.py:nope", name="acc"), base_dir=rules_dir)


# ---------------------------------------------------------------- scorer: sums and error policies


def test_weighted_sum_of_functions(rules_dir):
    cfg = {
        "functions": [
            {"name": "len", "kind": "rule", "path": "rules.py:batched", "weight": 0.5},
            {"name": "fmt", "kind": "builtin", "builtin": "format_regex", "kwargs": {"pattern": "a"},
             "weight": -2},
        ]
    }
    result = RewardScorer(cfg, base_dir=rules_dir).score(["p", "q"], ["aa", "bbbb"], {"answer": [0, 1]})
    assert result.per_function == {"len": [2.0, 5.0], "fmt": [1.0, 0.0]}
    assert result.rewards == [0.5 * 2 - 2 * 1, 0.5 * 5]
    assert set(result.seconds) == {"len", "fmt"}


def test_fail_policy_names_function_sample_previews_and_exception(rules_dir):
    scorer = RewardScorer(rule_cfg("rules.py:flaky", name="acc"), base_dir=rules_dir)
    with pytest.raises(RewardError) as err:
        scorer.score(["p0", "p1", "the prompt of two"], ["ok", "ok", "boom"])
    msg = str(err.value)
    assert "reward function 'acc' (rule rules.py:flaky) failed on sample 2 of 3" in msg
    assert "ZeroDivisionError: boom in rule" in msg and "rules.py:" in msg  # user file and line
    assert "prompt: 'the prompt of two'" in msg and "completion: 'boom'" in msg
    assert "on_error: zero" in msg


def test_zero_policy_records_errors_and_keeps_other_samples(rules_dir):
    cfg = {
        "functions": [
            {"name": "acc", "kind": "rule", "path": "rules.py:flaky", "weight": 2.0},
            {"name": "fmt", "kind": "builtin", "builtin": "format_regex", "kwargs": {"pattern": "o"}},
        ],
        "on_error": "zero",
    }
    result = RewardScorer(cfg, base_dir=rules_dir).score(["a", "b", "c"], ["ok", "boom", "boom"])
    assert result.per_function["acc"] == [1.0, 0.0, 0.0]
    assert result.rewards == [3.0, 1.0, 1.0]  # fmt still counts where acc failed
    assert [(e.function, e.index, e.completion_preview) for e in result.errors] == [
        ("acc", 1, "boom"), ("acc", 2, "boom")
    ]
    assert "ZeroDivisionError: boom in rule" in result.errors[0].message
    assert result.errors[0].prompt_preview == "b"


def test_non_finite_and_non_numeric_values(rules_dir):
    completions = ["fine", "nan", "inf", "none", "text"]
    zero = RewardScorer(rule_cfg("rules.py:weird", on_error="zero"), base_dir=rules_dir)
    result = zero.score(["p"] * 5, completions)
    assert result.rewards == [2.0, 0.0, 0.0, 0.0, 0.0]
    messages = {e.index: e.message for e in result.errors}
    assert set(messages) == {1, 2, 3, 4}
    assert "non-finite value nan" in messages[1] and "non-finite value inf" in messages[2]
    assert "returned None" in messages[3] and "returned '1.0' (str)" in messages[4]
    with pytest.raises(RewardError, match="failed on sample 1 of 5: returned a non-finite value nan"):
        RewardScorer(rule_cfg("rules.py:weird"), base_dir=rules_dir).score(["p"] * 5, completions)


def test_wrong_length_and_wrong_type(rules_dir):
    with pytest.raises(RewardError, match="returned 2 values for 3 completions"):
        RewardScorer(rule_cfg("rules.py:short"), base_dir=rules_dir).score(["p"] * 3, ["a", "b", "c"])
    result = RewardScorer(rule_cfg("rules.py:short", on_error="zero"), base_dir=rules_dir).score(
        ["p"] * 3, ["a", "b", "c"]
    )
    assert result.rewards == [0.0] * 3 and [e.index for e in result.errors] == [0, 1, 2]
    with pytest.raises(RewardError, match="returned a float, expected a list of 2 floats"):
        RewardScorer(rule_cfg("rules.py:scalar"), base_dir=rules_dir).score(["p"] * 2, ["a", "b"])


def test_builtin_data_error_is_isolated_to_its_sample():
    cfg = {"functions": [{"name": "num", "kind": "builtin", "builtin": "numeric_answer"}], "on_error": "zero"}
    result = RewardScorer(cfg).score(["p"] * 3, ["#### 1", "#### 2", "#### 3"], {"answer": ["1", None, "4"]})
    assert result.rewards == [1.0, 0.0, 0.0]
    assert [(e.index, "expected a number" in e.message) for e in result.errors] == [(1, True)]


def test_score_input_checks(rules_dir):
    scorer = RewardScorer(rule_cfg("rules.py:batched"), base_dir=rules_dir)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        scorer.score(["a", "b"], ["c", "d"], {"answer": [1]})
    with pytest.raises(ValueError, match="'completions' clashes"):
        scorer.score(["a"], ["c"], {"completions": [1]})
    empty = scorer.score([], [], {"answer": []})
    assert empty.rewards == [] and empty.per_function == {"r": []}


def test_preview_keeps_start_and_end():
    text = "A" * 100 + "B" * 100
    p = preview(text, 40)
    assert p.startswith("AAAA") and p.endswith("BBBB") and " ... " in p and len(p) <= 40


# ---------------------------------------------------------------- HTTP scorer


class _Handler(BaseHTTPRequestHandler):
    hits: ClassVar[dict[str, int]] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(payload["completions"])
        if self.path == "/ok":
            assert self.headers["X-Token"] == "secret"
            rewards = [len(c) + a for c, a in zip(payload["completions"], payload["columns"]["answer"])]
            self._reply(200, json.dumps({"rewards": rewards, "prompts_seen": payload["prompts"]}).encode())
        elif self.path == "/always500":
            self._reply(500, b"model server overloaded")
        elif self.path == "/flaky" and _Handler.hits[self.path] == 1:
            self._reply(503, b"warming up")
        elif self.path == "/flaky":
            self._reply(200, json.dumps({"rewards": [1.5] * n}).encode())
        elif self.path == "/badjson":
            self._reply(200, b"<html>not json</html>")
        elif self.path == "/wronglen":
            self._reply(200, json.dumps({"rewards": [1.0] * (n + 1)}).encode())
        elif self.path == "/norewards":
            self._reply(200, json.dumps({"scores": [1.0] * n}).encode())
        elif self.path == "/nan":
            self._reply(200, json.dumps({"rewards": [1.0, None][:n]}).encode())
        elif self.path == "/slow":
            time.sleep(1.0)
            self._reply(200, json.dumps({"rewards": [1.0] * n}).encode())
        else:
            self._reply(404, b"no such route")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_success(server):
    scorer = HttpScorer(server + "/ok", headers={"X-Token": "secret"})
    assert scorer(["p1", "p2"], ["abc", "d"], answer=[1, 2]) == [4, 3]


def test_http_500_retries_then_error(server):
    _Handler.hits.clear()
    scorer = HttpScorer(server + "/always500", max_retries=2, retry_backoff_s=0.01)
    with pytest.raises(HttpScorerError, match=r"failed 3 times.*HTTP 500: model server overloaded"):
        scorer(["p"], ["c"])
    assert _Handler.hits["/always500"] == 3
    assert HttpScorer(server + "/flaky", retry_backoff_s=0.01)(["p", "q"], ["c", "d"]) == [1.5, 1.5]
    assert _Handler.hits["/flaky"] == 2


def test_http_client_errors_are_not_retried(server):
    _Handler.hits.clear()
    with pytest.raises(HttpScorerError, match="answered HTTP 404: no such route"):
        HttpScorer(server + "/missing", retry_backoff_s=0.01)(["p"], ["c"])
    assert _Handler.hits["/missing"] == 1


@pytest.mark.parametrize(
    "route, message",
    [
        ("/badjson", "body is not JSON: '<html>not json</html>'"),
        ("/wronglen", "returned 3 rewards for 2 completions"),
        ("/norewards", 'without a "rewards" list'),
    ],
)
def test_http_bad_answers(server, route, message):
    with pytest.raises(HttpScorerError, match=message):
        HttpScorer(server + route, max_retries=0)(["p", "q"], ["c", "d"])


def test_http_timeout(server):
    start = time.perf_counter()
    with pytest.raises(HttpScorerError, match=r"failed 2 times \(timeout_s 0.2 per try.*(timed out|Timeout)"):
        HttpScorer(server + "/slow", timeout_s=0.2, max_retries=1, retry_backoff_s=0.01)(["p"], ["c"])
    assert time.perf_counter() - start < 1.5


def test_http_connection_refused():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HttpScorerError, match="failed 1 times.*ConnectionRefusedError"):
        HttpScorer(f"http://127.0.0.1:{port}/x", max_retries=0)(["p"], ["c"])


def test_http_non_json_columns_are_named():
    with pytest.raises(HttpScorerError, match=r"columns that are not JSON: \['blob'\]"):
        HttpScorer("http://127.0.0.1:9/x")(["p"], ["c"], blob=[object()], fine=[1])


def test_http_through_scorer_policies(server):
    cfg = {"functions": [{"name": "judge", "kind": "http", "url": server + "/nan", "max_retries": 0}]}
    with pytest.raises(RewardError, match=r"'judge' \(http .*/nan\) failed on sample 1 of 2: returned None"):
        RewardScorer(cfg).score(["p", "q"], ["c", "d"])
    cfg = {"functions": [{"name": "judge", "kind": "http", "url": server + "/badjson", "max_retries": 0}],
           "on_error": "zero"}
    result = RewardScorer(cfg).score(["p", "q"], ["c", "d"])
    assert result.rewards == [0.0, 0.0]
    assert [e.index for e in result.errors] == [0, 1] and "not JSON" in result.errors[0].message


# ---------------------------------------------------------------- reward model scorer


def test_running_mean_std_matches_population_statistics():
    import random

    rng = random.Random(0)
    stream = [rng.gauss(3.0, 2.0) for _ in range(101)]
    stats = RunningMeanStd()
    for chunk in (stream[:1], stream[1:40], [], stream[40:]):
        stats.update(chunk)
    assert stats.count == 101
    assert stats.mean == pytest.approx(statistics.fmean(stream), rel=1e-12)
    assert stats.std == pytest.approx(statistics.pstdev(stream), rel=1e-12)
    restored = RunningMeanStd()
    restored.load_state_dict(stats.state_dict())
    assert restored.normalize([1.0]) == stats.normalize([1.0])


CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 #?.,\n"


def build_tiny_reward_model(out: Path, num_labels: int = 1, with_pad: bool = True) -> Path:
    """A random Qwen2ForSequenceClassification (head_dim 32) with a character-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    # No merges: one token per char.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        num_labels=num_labels, pad_token_id=0 if with_pad else None, eos_token_id=1,
    )
    model = Qwen2ForSequenceClassification(config).eval()
    with torch.no_grad():  # a visible spread of scores (the default init makes them all near 0)
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"))


def direct_score(path: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def rm_cfg(path, **kw) -> dict:
    return {"functions": [{"name": "rm", "kind": "model", "model_path": str(path), "device": "cpu", **kw}]}


PROMPTS = ["what is 2 plus 2?", "say a", "write a long answer about the sea", "q", "#?"]
COMPLETIONS = [" 4", " aaaa", " the sea is wide and deep and blue", "", " no"]


def test_reward_model_batches_match_single_unpadded_forward(tiny_rm):
    from transformers import AutoTokenizer

    scorer = RewardScorer(rm_cfg(tiny_rm, batch_size=2))
    result = scorer.score(PROMPTS, COMPLETIONS)
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    expected = [direct_score(tiny_rm, tok(p + c)["input_ids"]) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert result.per_function["rm"] == pytest.approx(expected, abs=1e-5)
    assert len({round(v, 4) for v in expected}) == len(expected)  # the model does tell texts apart
    # Batch composition does not change a score (right padding, pooled at the last real token).
    alone = RewardScorer(rm_cfg(tiny_rm, batch_size=16)).score(PROMPTS[2:3], COMPLETIONS[2:3]).rewards
    assert alone == pytest.approx(expected[2:3], abs=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_truncation(tiny_rm, side):
    from transformers import AutoTokenizer

    prompt, completion = "tell me " * 20, "the end 42"
    ids = AutoTokenizer.from_pretrained(tiny_rm)(prompt + completion)["input_ids"]
    assert len(ids) > 32
    kept = ids[-32:] if side == "left" else ids[:32]
    scorer = RewardScorer(rm_cfg(tiny_rm, max_length=32, truncation_side=side))
    got = scorer.score([prompt], [completion]).rewards
    assert got == pytest.approx([direct_score(tiny_rm, kept)], abs=1e-5)


def test_reward_model_normalization_uses_running_stats(tiny_rm):
    raw = RewardScorer(rm_cfg(tiny_rm)).score(PROMPTS, COMPLETIONS).rewards
    scorer = RewardScorer(rm_cfg(tiny_rm, normalize=True))
    first = scorer.score(PROMPTS[:3], COMPLETIONS[:3]).rewards
    second = scorer.score(PROMPTS[3:], COMPLETIONS[3:]).rewards
    mean3, std3 = statistics.fmean(raw[:3]), statistics.pstdev(raw[:3])
    assert first == pytest.approx([(r - mean3) / std3 for r in raw[:3]], abs=1e-4)
    mean5, std5 = statistics.fmean(raw), statistics.pstdev(raw)
    assert second == pytest.approx([(r - mean5) / std5 for r in raw[3:]], abs=1e-4)
    state = scorer.state_dict()
    assert state["rm"]["stats"]["count"] == 5
    resumed = RewardScorer(rm_cfg(tiny_rm, normalize=True))
    resumed.load_state_dict(state)
    again = resumed.score(PROMPTS[:1], COMPLETIONS[:1]).rewards[0]
    stats = RunningMeanStd()
    stats.update(raw + raw[:1])
    assert again == pytest.approx((raw[0] - stats.mean) / stats.std, abs=1e-4)


def test_reward_model_without_pad_token_pads_with_eos(tmp_path):
    path = build_tiny_reward_model(tmp_path / "nopad", with_pad=False)
    scorer = RewardScorer(rm_cfg(path, batch_size=4))
    out = scorer.score(PROMPTS[:3], COMPLETIONS[:3]).rewards
    singles = [RewardScorer(rm_cfg(path)).score([p], [c]).rewards[0]
               for p, c in zip(PROMPTS[:3], COMPLETIONS[:3])]
    assert out == pytest.approx(singles, abs=1e-5) and all(math.isfinite(v) for v in out)


def test_reward_model_load_errors(tmp_path):
    path = build_tiny_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(RewardLoadError, match=r"'rm' \(model\).*has 2 outputs.*num_labels=1"):
        RewardScorer(rm_cfg(path))
    with pytest.raises(RewardLoadError, match="could not load the reward model from"):
        RewardScorer(rm_cfg(tmp_path / "does-not-exist"))
