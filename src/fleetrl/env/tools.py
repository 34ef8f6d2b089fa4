"""Built-in tools for tool-calling episodes: a calculator, a Python sandbox, JSON tool-call parsing,
and ``ToolEnv``, an environment that runs the calls a turn makes and answers with their results.

The sandbox is a separate Python process with a wall-clock timeout, an address-space cap, an output
cap (stdout/stderr go to files capped by RLIMIT_FSIZE, so a flood never reaches memory), no network
(a new network namespace where the OS allows it, and Python's socket module refused in any case), and
a scratch directory removed afterwards. It contains accidents of a policy's code, not an attacker:
run hostile code in a container.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fleetrl.env.base import Environment, StepResult

# -- tool-call parsing ---------------------------------------------------------------------------

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


class ToolCallError(ValueError):
    """A turn tried to call a tool but the call is malformed (the message goes back to the policy)."""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Calls in the common JSON style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (any number), or a turn that is one such JSON object. Plain text: no calls."""
    blobs = _TAGGED.findall(text)
    if not blobs:
        stripped = text.strip()
        if not (stripped.startswith("{") and '"name"' in stripped):
            return []
        blobs = [stripped]
    calls = []
    for blob in blobs:
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call is not valid JSON ({e.msg} at char {e.pos}): {blob[:200]}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError(f'a tool call must be {{"name": str, "arguments": {{...}}}}, got: {blob[:200]}')
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some templates emit arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ToolCallError(f"arguments of {obj['name']!r} are not JSON: {args[:200]}") from e
        if not isinstance(args, dict):
            raise ToolCallError(f"arguments of {obj['name']!r} must be an object, got {type(args).__name__}")
        calls.append(ToolCall(obj["name"], args))
    return calls


# -- calculator ---------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 1000  # 10**1000 is fine; 9**9**9 would take the worker down


def calculate(expression: str) -> str:
    """Arithmetic on numbers (+ - * / // % ** and parentheses); an error message on bad input."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"unsupported expression element {type(node).__name__}: only numbers and + - * / // % **")

    try:
        value = ev(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        return f"error: {type(e).__name__}: {e}"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    return str(value)


# -- python sandbox -----------------------------------------------------------------------------

# Runs first in the sandbox: refuse sockets (the namespace is the real barrier where available).
_PRELUDE = """
import socket as _s
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in this sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
_s.getaddrinfo = _no_network
del _s, _no_network
"""


@dataclass
class SandboxResult:
    output: str  # stdout then stderr, truncated to the cap
    exit_code: int | None  # None: killed at the timeout
    timed_out: bool = False
    truncated: bool = False
    seconds: float = 0.0

    def observation(self) -> str:
        notes = []
        if self.timed_out:
            notes.append("timed out: killed")
        elif self.exit_code not in (0, None):
            notes.append(f"exit code {self.exit_code}")
        if self.truncated:
            notes.append("output truncated")
        return self.output + (f"\n[{'; '.join(notes)}]" if notes else "")


def _limits(memory_mb: int, output_bytes: int):
    def apply() -> None:
        import ctypes
        import resource

        os.setsid()  # its own process group: the timeout kills the children too
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:  # a private, empty network namespace (needs CAP_SYS_ADMIN; the prelude covers the rest)
            ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
        except Exception:  # noqa: BLE001 - best effort by design
            pass
    return apply


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 512,
               max_output_bytes: int = 16384) -> SandboxResult:
    """Run ``code`` in a fresh interpreter (isolated mode) in a scratch directory removed afterwards."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fleetrl-sandbox-") as scratch:
        script = os.path.join(scratch, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + "\n" + code)
        out_path = os.path.join(scratch, "output.txt")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", script], cwd=scratch, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=_limits(memory_mb, max_output_bytes + 1),
                env={"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch},
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with open(out_path, "rb") as f:
            data = f.read(max_output_bytes + 1)
    truncated = len(data) > max_output_bytes
    text = data[:max_output_bytes].decode("utf-8", errors="replace")
    # A write past RLIMIT_FSIZE ends the process with SIGXFSZ: that is truncation, not a crash.
    if proc.returncode == -signal.SIGXFSZ:
        truncated = True
    return SandboxResult(text, None if timed_out else proc.returncode, timed_out, truncated,
                         time.perf_counter() - t0)


# -- the environment ----------------------------------------------------------------------------

TOOL_SCHEMAS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "python": {"type": "function", "function": {
        "name": "python", "description": "Run Python code; returns what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
}


class ToolEnv(Environment):
    """Offers ``tools`` (calculator, python) in the chat template's ``tools`` argument; each turn's
    tool calls run and their results come back as ``tool`` messages; a turn without a call ends the
    episode (its reward comes from reward.functions, which see the whole conversation)."""

    def __init__(self, tools: tuple[str, ...] | list[str] = ("calculator", "python"), timeout_s: float = 10.0,
                 memory_mb: int = 512, max_output_bytes: int = 16384):
        unknown = sorted(set(tools) - set(TOOL_SCHEMAS))
        if unknown:
            raise ValueError(f"rollout.episode.env_kwargs.tools: unknown {unknown}; built-in: {sorted(TOOL_SCHEMAS)}")
        self.tools = [TOOL_SCHEMAS[t] for t in tools]
        self.names = set(tools)
        self.limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_output_bytes": max_output_bytes}

    async def reset(self, row: dict[str, Any]):
        prompt = row["prompt"]
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    async def call(self, call: ToolCall) -> str:
        if call.name not in self.names:
            return f"error: no tool {call.name!r}; available: {sorted(self.names)}"
        if call.name == "calculator":
            return calculate(str(call.arguments.get("expression", "")))
        return (await asyncio.to_thread(run_python, str(call.arguments.get("code", "")), **self.limits)).observation()

    async def step(self, text: str) -> StepResult:
        try:
            calls = parse_tool_calls(text)
        except ToolCallError as e:
            return StepResult(observation=[{"role": "tool", "content": f"error: {e}"}])
        if not calls:
            return StepResult(done=True)
        results = await asyncio.gather(*(self.call(c) for c in calls))
        return StepResult(observation=[{"role": "tool", "content": r} for r in results])
