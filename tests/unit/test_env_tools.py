"""Built-in tools: JSON tool-call parsing, the calculator, the Python sandbox's limits, ToolEnv."""

import asyncio
import glob
import os
import tempfile

import pytest

from fleetrl.env.tools import ToolCallError, ToolEnv, calculate, parse_tool_calls, run_python


def test_parse_tool_calls():
    text = 'Let me check.<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>' \
           '<tool_call>\n{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}\n</tool_call>'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "2+3"}),
                                                      ("python", {"code": "print(1)"})]
    assert parse_tool_calls('{"name": "calculator", "arguments": {"expression": "1"}}')[0].name == "calculator"
    assert parse_tool_calls("The answer is 5.") == []
    with pytest.raises(ToolCallError, match="not valid JSON"):
        parse_tool_calls("<tool_call>{name: calculator}</tool_call>")
    with pytest.raises(ToolCallError, match='must be {"name": str'):
        parse_tool_calls('<tool_call>["calculator"]</tool_call>')
    with pytest.raises(ToolCallError, match="must be an object"):
        parse_tool_calls('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>')


def test_calculator():
    assert calculate("2 + 3 * (4 - 1)") == "11"
    assert calculate("7 / 2") == "3.5" and calculate("-2 ** 2") == "-4" and calculate("6/3") == "2"
    assert calculate("1/0").startswith("error: ZeroDivisionError")
    assert "only numbers" in calculate("__import__('os').system('ls')")
    assert "larger than 1000" in calculate("9 ** 9 ** 9")
    assert calculate("2 +").startswith("error: SyntaxError")


def _scratch_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "fleetrl-sandbox-*")))


def test_sandbox_runs_code_and_removes_its_scratch_dir():
    before = _scratch_dirs()
    r = run_python("import os\nopen('f.txt', 'w').write('x')\nprint(sum(range(10)), os.listdir('.'))")
    assert r.exit_code == 0 and not r.timed_out and not r.truncated
    assert r.output.startswith("45 [") and "f.txt" in r.output
    assert _scratch_dirs() == before


def test_sandbox_timeout_kills_a_hang():
    r = run_python("import time\nwhile True: time.sleep(0.1)", timeout_s=1.0)
    assert r.timed_out and r.exit_code is None and "timed out: killed" in r.observation()


def test_sandbox_memory_cap():
    r = run_python("x = bytearray(400 * 1024 * 1024)\nprint('allocated')", memory_mb=256)
    assert r.exit_code != 0 and "MemoryError" in r.output and "allocated" not in r.output


def test_sandbox_output_is_truncated():
    r = run_python("import sys\nfor _ in range(100000): sys.stdout.write('y' * 100)", max_output_bytes=1000)
    assert r.truncated and len(r.output) == 1000 and "output truncated" in r.observation()


def test_sandbox_has_no_network():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\nprint('connected')")
    assert r.exit_code != 0 and "connected" not in r.output
    assert "PermissionError" in r.output and "network access is disabled" in r.output


def test_sandbox_crash_is_an_observation():
    r = run_python("raise SystemExit(3)")
    assert r.exit_code == 3 and "exit code 3" in r.observation()


def test_tool_env_answers_calls_and_ends_without_one():
    env = ToolEnv(timeout_s=2.0)
    first = asyncio.run(env.reset({"prompt": "What is 2+3?"}))
    assert first == [{"role": "user", "content": "What is 2+3?"}] and len(env.tools) == 2
    r = asyncio.run(env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
                             '<tool_call>{"name": "python", "arguments": {"code": "print(2+3)"}}</tool_call>'))
    assert not r.done and [m["content"].strip() for m in r.observation] == ["5", "5"]
    assert all(m["role"] == "tool" for m in r.observation)
    bad = asyncio.run(env.step('<tool_call>{"name": "web", "arguments": {}}</tool_call>'))
    assert "no tool 'web'" in bad.observation[0]["content"]
    broken = asyncio.run(env.step("<tool_call>{oops</tool_call>"))
    assert broken.observation[0]["content"].startswith("error: tool call is not valid JSON")
    assert asyncio.run(env.step("It is 5.")).done
    with pytest.raises(ValueError, match="unknown \\['shell'\\]"):
        ToolEnv(tools=["shell"])
