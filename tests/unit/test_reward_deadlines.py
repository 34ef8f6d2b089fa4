"""Deadlines of the reward service, each fed its hang: a rule function that never returns, an HTTP
server that drips bytes, one that answers too much and one that redirects. Servers listen on
127.0.0.1 only. Time bounds are loose (a few times the deadline): the point is that nothing waits
forever."""

from __future__ import annotations

import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from pydantic import ValidationError

from fleetrl.reward import RewardHungError
from fleetrl.reward.config import RewardConfig
from fleetrl.reward.http_scorer import HttpScorer, HttpScorerError
from fleetrl.reward.scorer import MAX_HUNG_CALLS, RewardError, RewardScorer

LOOSE_S = 10.0  # "returns within 10 s" for deadlines of a second or two

# ---------------------------------------------------------------- config


def test_timeout_defaults_and_overrides():
    cfg = RewardConfig(functions=[
        {"name": "a", "kind": "rule", "path": "f.py:g"},
        {"name": "b", "kind": "builtin", "builtin": "exact_match", "timeout_s": 5},
        {"name": "h", "kind": "http", "url": "http://127.0.0.1:1/s"},
    ])
    assert cfg.timeout_s == 60.0
    assert [f.timeout_s for f in cfg.functions] == [None, 5.0, 30.0]
    assert cfg.functions[2].max_response_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 10**9])
def test_timeout_validation(bad):
    # inf and NaN are refused before the range check, by every config model (core.strict.StrictModel).
    why = "finite number" if bad != bad or bad == float("inf") else "above 0"
    with pytest.raises(ValidationError, match=rf"timeout_s\n.*{why}"):
        RewardConfig(timeout_s=bad)
    with pytest.raises(ValidationError, match=rf"functions\.0\.rule\.timeout_s\n.*{why}"):
        RewardConfig(functions=[{"name": "a", "kind": "rule", "path": "f.py:g", "timeout_s": bad}])
    with pytest.raises(ValidationError, match=rf"functions\.0\.http\.timeout_s\n.*{why}"):
        RewardConfig(functions=[{"name": "h", "kind": "http", "url": "http://127.0.0.1:1/", "timeout_s": bad}])
    with pytest.raises(ValidationError, match=r"max_response_bytes"):
        RewardConfig(functions=[{"name": "h", "kind": "http", "url": "http://127.0.0.1:1/", "max_response_bytes": 0}])


# ---------------------------------------------------------------- rule functions that never return

RULES = """
import fleetrl_test_gate


def hang(prompts, completions, **columns):
    fleetrl_test_gate.entered.set()
    fleetrl_test_gate.release.wait()  # "forever": until the test's teardown
    return [1.0] * len(completions)


def hang_on_some(prompts, completions, **columns):
    if "boom" in completions and len(completions) > 1:
        raise ValueError("boom")  # batch fails, so the scorer reruns one sample at a time
    if completions == ["hang"]:
        fleetrl_test_gate.release.wait()
    return [2.0] * len(completions)


def slow_alone(prompts, completions, **columns):
    if len(completions) > 1:
        raise RuntimeError("batch")
    import time

    time.sleep(0.15)
    return [3.0]


def fast(prompts, completions, **columns):
    return [float(len(c)) for c in completions]
"""


@pytest.fixture()
def gate():
    """A module the rule file imports: `release` is set at teardown, so no hung thread outlives the test."""
    module = types.ModuleType("fleetrl_test_gate")
    module.release = threading.Event()
    module.entered = threading.Event()
    sys.modules[module.__name__] = module
    yield module
    module.release.set()
    del sys.modules[module.__name__]


@pytest.fixture()
def rules_dir(tmp_path, gate):
    (tmp_path / "rules.py").write_text(RULES)
    return tmp_path


def functions(*specs, **kw) -> dict:
    return {"functions": [{"name": n, "kind": "rule", "path": f"rules.py:{fn}", **o} for n, fn, o in specs], **kw}


def wait_until(predicate, seconds: float = LOOSE_S) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_hung_rule_with_fail_raises_naming_function_timeout_and_sample(rules_dir):
    scorer = RewardScorer(functions(("acc", "hang", {}), timeout_s=0.5), base_dir=rules_dir)
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        scorer.score(["the prompt", "q"], ["the completion", "d"])
    assert time.monotonic() - start < LOOSE_S
    msg = str(err.value)
    assert "reward function 'acc' (rule rules.py:hang) failed on sample 0 of 2: timed out after 0.5 s" in msg
    assert "rules.py:7 in hang" in msg  # the line the call was stuck on
    assert "reward.timeout_s" in msg and "prompt: 'the prompt'" in msg and "completion: 'the completion'" in msg
    assert scorer.hung_calls() == {"acc": 1}


def test_hung_rule_with_zero_scores_0_counts_it_and_other_functions_still_score(rules_dir, gate):
    cfg = functions(("acc", "hang", {"timeout_s": 0.5}), ("len", "fast", {}), on_error="zero")
    scorer = RewardScorer(cfg, base_dir=rules_dir)
    start = time.monotonic()
    result = scorer.score(["p", "q"], ["ab", "cde"])
    assert time.monotonic() - start < LOOSE_S
    assert result.per_function == {"acc": [0.0, 0.0], "len": [2.0, 3.0]}
    assert result.rewards == [2.0, 3.0]
    assert [(e.function, e.index) for e in result.errors] == [("acc", 0), ("acc", 1)]
    assert result.errors[0].message.startswith("timed out after 0.5 s")
    assert "reward.functions[0].timeout_s" in result.errors[0].message  # the setting to change
    assert result.hung_calls == {"acc": 1}
    gate.release.set()  # the abandoned call returns: it is no longer counted as hung
    assert wait_until(lambda: scorer.hung_calls() == {})


def test_timed_out_sample_in_a_one_by_one_rerun(rules_dir):
    # The batch raises, so each sample runs alone: "boom" alone is fine, "hang" uses up the reruns'
    # one deadline, and the sample after it is not run at all (n samples cost two deadlines, not n).
    scorer = RewardScorer(functions(("acc", "hang_on_some", {}), timeout_s=0.5, on_error="zero"), base_dir=rules_dir)
    start = time.monotonic()
    result = scorer.score(["p"] * 4, ["ok", "boom", "hang", "ok"])
    assert time.monotonic() - start < 0.5 + LOOSE_S
    assert result.per_function["acc"] == [2.0, 2.0, 0.0, 0.0]
    assert [e.index for e in result.errors] == [2, 3]
    assert result.errors[0].message.startswith("timed out after 0.")
    assert "what was left of the one-sample reruns' deadline of 0.5 s" in result.errors[0].message
    assert result.errors[1].message.startswith("not scored: the batch raised ValueError: boom")
    assert "used up the function's deadline of 0.5 s (reward.timeout_s) before sample 3" in result.errors[1].message


def test_one_sample_reruns_share_one_deadline(rules_dir):
    # Each sample alone takes 0.15 s, under the deadline of 0.5 s: without a shared deadline, 20 reruns
    # after the failed batch would take 3 s (n x timeout_s in the worst case, 256 x 60 s by default).
    scorer = RewardScorer(functions(("acc", "slow_alone", {}), timeout_s=0.5, on_error="zero"), base_dir=rules_dir)
    start = time.monotonic()
    result = scorer.score(["p"] * 20, ["c"] * 20)
    took = time.monotonic() - start
    assert took < 1.5, took
    scored = [v for v in result.per_function["acc"] if v == 3.0]
    assert 1 <= len(scored) <= 4
    assert len(result.errors) == 20 - len(scored)
    assert result.errors[-1].message.startswith("not scored: the batch raised RuntimeError: batch")


def test_function_with_too_many_hung_calls_is_refused_as_broken(rules_dir, gate):
    scorer = RewardScorer(functions(("acc", "hang", {}), ("len", "fast", {}), timeout_s=0.2, on_error="zero"),
                          base_dir=rules_dir)
    start = time.monotonic()
    for k in range(MAX_HUNG_CALLS):
        assert scorer.score(["p"], ["c"]).hung_calls == {"acc": k + 1}
    with pytest.raises(RewardHungError) as err:  # whatever on_error says
        scorer.score(["p"], ["c"])
    assert time.monotonic() - start < LOOSE_S + MAX_HUNG_CALLS * 0.2
    msg = str(err.value)
    assert f"reward function 'acc' (rule rules.py:hang, file {rules_dir / 'rules.py'}) is broken" in msg
    assert f"{MAX_HUNG_CALLS} of its calls passed their deadline of 0.2 s (reward.timeout_s)" in msg
    assert "restarting the reward actor" in msg
    assert isinstance(err.value, RewardError)
    # Once the calls return, the function is called again.
    gate.release.set()
    assert wait_until(lambda: scorer.hung_calls() == {})
    assert scorer.score(["p"], ["cc"]).rewards == [1.0 + 2.0]


# ---------------------------------------------------------------- HTTP servers that misbehave


class _Handler(BaseHTTPRequestHandler):
    hits: ClassVar[dict[str, int]] = {}
    auth: ClassVar[dict[str, str | None]] = {}
    stop = threading.Event()

    def log_message(self, *args):
        pass

    def do_POST(self):
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        _Handler.auth[self.path] = self.headers.get("Authorization")
        self.rfile.read(int(self.headers["Content-Length"]))
        try:
            getattr(self, "route_" + self.path.strip("/"))()
        except OSError:  # the client hung up, as it should
            pass

    def route_drip_body(self):  # headers at once, then one byte per second of a 100-byte body
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.flush()
        self._drip(b"{" + b" " * 99)

    def route_drip_headers(self):  # even the status line comes one byte per second
        self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"rewards\": []}")

    def _drip(self, data: bytes):
        for byte in data:
            if _Handler.stop.wait(1.0):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def route_big(self):  # declares its size
        body = b'{"rewards": [1.0], "pad": "' + b"x" * 5000 + b'"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_big_undeclared(self):  # no Content-Length: the body ends when the connection closes
        self.close_connection = True
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
        self.wfile.write(b'{"rewards": [1.0], "pad": "' + b"x" * 5000 + b'"}')

    def route_small(self):
        body = b'{"rewards": [1.0]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_redirect(self):
        self.send_response(302)
        self.send_header("Location", "/small")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    _Handler.stop.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("route", ["/drip_body", "/drip_headers"])
def test_http_dripping_server_ends_at_the_total_deadline(server, route):
    # Each byte comes within the 2 s socket timeout, so only a total deadline ends the request.
    start = time.monotonic()
    with pytest.raises(HttpScorerError) as err:
        HttpScorer(server + route, timeout_s=2.0, max_retries=0)(["p"], ["c"])
    assert time.monotonic() - start < LOOSE_S
    assert "failed 1 times (timeout_s 2 per try" in str(err.value)
    assert "TimeoutError: no complete answer within timeout_s 2 s (connect, send and read together)" in str(err.value)


def test_http_dripping_server_through_the_scorer_follows_on_error(server):
    cfg = {"functions": [{"name": "judge", "kind": "http", "url": server + "/drip_body", "timeout_s": 1,
                          "max_retries": 1, "retry_backoff_s": 0.01}], "on_error": "zero"}
    start = time.monotonic()
    result = RewardScorer(cfg).score(["p", "q"], ["c", "d"])
    assert time.monotonic() - start < LOOSE_S
    assert result.rewards == [0.0, 0.0] and [e.index for e in result.errors] == [0, 1]
    assert "failed 2 times" in result.errors[0].message and "no complete answer" in result.errors[0].message


@pytest.mark.parametrize("route, message", [
    ("/big", r"answered with a body of \d+ bytes \(Content-Length\), over max_response_bytes 1000"),
    ("/big_undeclared", r"answered with a body over max_response_bytes 1000 \(stopped reading at \d+ bytes\)"),
])
def test_http_body_over_the_cap_is_an_error_naming_the_limit(server, route, message):
    _Handler.hits.clear()
    with pytest.raises(HttpScorerError, match=message):
        HttpScorer(server + route, max_response_bytes=1000, retry_backoff_s=0.01)(["p"], ["c"])
    assert _Handler.hits[route] == 1  # not retried: the answer would be the same
    assert HttpScorer(server + "/small", max_response_bytes=1000)(["p"], ["c"]) == [1.0]


def test_http_redirect_is_not_followed_and_names_the_location(server):
    _Handler.hits.clear()
    scorer = HttpScorer(server + "/redirect", headers={"Authorization": "Bearer secret"}, retry_backoff_s=0.01)
    with pytest.raises(HttpScorerError) as err:
        scorer(["p"], ["c"])
    assert "answered HTTP 302 redirecting to '/small'" in str(err.value)
    assert "Authorization" in str(err.value) and "set the url" in str(err.value)
    assert _Handler.hits == {"/redirect": 1}  # neither followed nor retried
    assert _Handler.auth["/redirect"] == "Bearer secret"


def test_http_function_deadline_in_the_scorer_covers_every_try():
    cfg = {"functions": [{"name": "judge", "kind": "http", "url": "http://127.0.0.1:1/s", "timeout_s": 10,
                          "max_retries": 2, "retry_backoff_s": 1}], "timeout_s": 1}
    (judge,) = RewardScorer(cfg).functions
    assert judge.timeout_s == 3 * 10 + (1 + 2) + 5  # tries, backoff, margin: reward.timeout_s does not cut it


def test_http_server_that_accepts_and_never_answers():
    # A raw socket that accepts the connection and reads nothing: the send/recv deadline ends it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(HttpScorerError, match="no complete answer within timeout_s 1 s"):
            HttpScorer(f"http://127.0.0.1:{port}/x", timeout_s=1.0, max_retries=0)(["p"], ["c"])
        assert time.monotonic() - start < LOOSE_S
