"""Built-in tools for tool-calling episodes: a calculator, a Python sandbox, JSON tool-call parsing,
and ``ToolEnv``, an environment that runs the calls a turn makes and answers with their results.

Everything here takes model output, which is hostile input: a malformed call, an expression that
would compute for hours, code that tries to escape. Each becomes an observation for the policy (an
``error: ...`` message), never an exception that ends the run; only a sandbox that cannot be set up
on this machine raises (:class:`~fleetrl.env.sandbox.SandboxUnavailable`, the tool refuses to run).
The python tool runs code in a bubblewrap sandbox (``fleetrl.env.sandbox``, docs/sandbox.md).
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from fleetrl.core.strict import StrictModel
from fleetrl.env.base import Environment, StepResult
from fleetrl.env.sandbox import Sandbox, SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = ["SandboxResult", "SandboxUnavailable", "ToolCall", "ToolCallError", "ToolEnv", "ToolEnvConfig",
           "calculate", "parse_tool_calls", "run_python"]

# -- tool-call parsing ---------------------------------------------------------------------------

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


class ToolCallError(ValueError):
    """A turn tried to call a tool but the call is malformed (the message goes back to the policy)."""


def _json(blob: str, what: str):
    try:
        return json.loads(blob)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"{what} is not valid JSON ({e.msg} at char {e.pos}): {blob[:200]}") from None
    except RecursionError:
        raise ToolCallError(f"{what} nests too deeply to parse: {blob[:200]}") from None
    except ValueError as e:  # e.g. an integer past Python's 4,300-digit limit
        raise ToolCallError(f"{what} cannot be read: {str(e)[:200]}") from None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Calls in the common JSON style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (any number), or a turn that is one such JSON object. Plain text: no calls. A malformed call
    (bad JSON, nesting too deep, a wrong shape) raises ToolCallError and nothing else."""
    blobs = _TAGGED.findall(text)
    if not blobs:
        stripped = text.strip()
        if not (stripped.startswith("{") and '"name"' in stripped):
            return []
        blobs = [stripped]
    calls = []
    for blob in blobs:
        obj = _json(blob, "tool call")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ToolCallError(f'a tool call must be {{"name": str, "arguments": {{...}}}}, got: {blob[:200]}')
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some templates emit arguments as a JSON string
            args = _json(args, f"arguments of {obj['name'][:100]!r}")
        if not isinstance(args, dict):
            raise ToolCallError(f"arguments of {obj['name'][:100]!r} must be an object, got {type(args).__name__}")
        calls.append(ToolCall(obj["name"], args))
    return calls


# -- calculator ---------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 100  # nesting of operations (a left-nested "1+1+...+1" counts each +)
# Every integer, operand or result, stays below this many bits (about 3,900 decimal digits, under
# Python's 4,300-digit str() limit), so each operation takes microseconds: the size of a product or
# a power is checked before it is computed, so no expression can make the worker compute for hours.
MAX_INT_BITS = 13_000
CALC_TIMEOUT_S = 2.0  # the calculator's own deadline, checked between steps
# ToolEnv's deadline of one calculator call (in a thread, off the event loop): a backstop after the above.
CALC_CALL_TIMEOUT_S = CALC_TIMEOUT_S + 1.0


class _CalcError(ValueError):
    """An expression the calculator refuses (its message goes back to the policy as it is)."""


def _size_check(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _CalcError(f"a number in it has more than {MAX_INT_BITS} bits (about {int(MAX_INT_BITS * 0.30103)} "
                         "digits)")
    return value


def _apply(op: type, left, right):
    """One binary operation, refused when an integer result would pass MAX_INT_BITS."""
    if isinstance(left, int) and isinstance(right, int):
        if op is ast.Pow and right > 0 and abs(left) > 1:
            if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                raise _CalcError(f"the power {_short(left)} ** {_short(right)} would have more than {MAX_INT_BITS} "
                                 f"bits (about {int(MAX_INT_BITS * 0.30103)} digits)")
        elif op is ast.Mult and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise _CalcError(f"the product would have more than {MAX_INT_BITS} bits")
    return _size_check(_BINARY[op](left, right))


def _short(x) -> str:
    text = str(x) if not isinstance(x, int) or x.bit_length() < 200 else f"<{x.bit_length()}-bit number>"
    return text[:60]


def _depth(tree: ast.AST) -> int:
    """How deep ``tree`` nests, walked without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


def calculate(expression: str, timeout_s: float = CALC_TIMEOUT_S) -> str:
    """Arithmetic on numbers (+ - * / // % ** and parentheses). Never raises: bad input, a result too
    large or a deadline passed gives an ``error: ...`` message. Bounded by the expression's length,
    its nesting and the size of every integer in it (MAX_INT_BITS), and by ``timeout_s`` between steps."""
    deadline = time.monotonic() + timeout_s

    def ev(node):
        if time.monotonic() > deadline:
            raise TimeoutError(f"took longer than {timeout_s:g} s")
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _size_check(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _apply(type(node.op), ev(node.left), ev(node.right))
        raise _CalcError(f"unsupported expression element {type(node).__name__}: only numbers and + - * / // % **")

    try:
        if not isinstance(expression, str):
            raise _CalcError(f"the expression must be a string, got {type(expression).__name__}")
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise _CalcError(f"the expression is {len(expression)} characters long, more than {MAX_EXPRESSION_CHARS}")
        tree = ast.parse(expression.strip(), mode="eval")
        if _depth(tree) > MAX_DEPTH:
            raise _CalcError(f"the expression nests more than {MAX_DEPTH} operations deep")
        value = ev(tree)
        if isinstance(value, float) and value.is_integer() and math.isfinite(value) and abs(value) < 2**53:
            value = int(value)
        return str(value)
    except _CalcError as e:
        return f"error: {e}"
    except Exception as e:  # noqa: BLE001 - whatever the expression does is an answer for the policy
        return f"error: {type(e).__name__}: {e}"


# -- python sandbox -----------------------------------------------------------------------------


def run_python(code: str, **limits) -> SandboxResult:
    """Run ``code`` in a fresh sandbox (``limits``: the fields of SandboxLimits). Raises
    SandboxUnavailable, and runs nothing, when the sandbox cannot be set up."""
    return Sandbox(SandboxLimits(**limits)).run(code)


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


class ToolEnvConfig(StrictModel):
    """``rollout.episode.env_kwargs`` of ``fleetrl.env.tools:ToolEnv``."""

    tools: list[Literal["calculator", "python"]] = Field(default_factory=lambda: ["calculator", "python"])
    max_calls: int = Field(8, ge=1)  # tool calls run per turn; more get an error message
    # The python tool's sandbox (fleetrl.env.sandbox.SandboxLimits, docs/sandbox.md).
    timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)  # wall clock of one call
    memory_mb: int = Field(512, ge=32)  # address space of each process
    max_output_bytes: int = Field(16384, ge=1)  # stdout + stderr; past it the call is killed
    max_processes: int = Field(32, ge=2)  # processes and threads inside one call
    cpu_s: int | None = Field(None, ge=1)  # CPU seconds of each process (null: timeout_s)
    scratch_mb: int = Field(64, ge=1)  # the writable /tmp (and /dev/shm) of one call
    # bubblewrap: every call isolated, and no call runs where that cannot be set up. none: model code
    # runs WITHOUT isolation (the worker's network, files and environment): an explicit, logged opt-in.
    isolation: Literal["bubblewrap", "none"] = "bubblewrap"
    python: str | None = None  # interpreter inside the sandbox (null: this Python's, else /usr/bin/python3)
    uid: int = Field(65534, gt=0)  # a worker running as root starts the sandbox as this user


class ToolEnv(Environment):
    """Offers ``tools`` (calculator, python) in the chat template's ``tools`` argument; each turn's
    tool calls run and their results come back as ``tool`` messages; a turn without a call ends the
    episode (its reward comes from reward.functions, which see the whole conversation). Keyword
    arguments: the fields of :class:`ToolEnvConfig`."""

    def __init__(self, **kwargs: Any):
        try:
            cfg = ToolEnvConfig(**kwargs)
        except ValidationError as e:
            raise ValueError("; ".join(_describe(err) for err in e.errors())) from None
        self.cfg = cfg
        self.tools = [TOOL_SCHEMAS[t] for t in cfg.tools]
        self.names = set(cfg.tools)
        limits = cfg.model_dump(exclude={"tools", "max_calls"})
        self.sandbox = Sandbox(SandboxLimits(**limits)) if "python" in self.names else None

    def preflight(self) -> str | None:
        """The python tool's sandbox works on this machine (SandboxUnavailable saying what to change)."""
        if self.sandbox is None:
            return None
        return f"python tool: {self.sandbox.probe()}"

    async def reset(self, row: dict[str, Any]):
        prompt = row["prompt"]
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    async def call(self, call: ToolCall) -> str:
        """One call's answer. Whatever the call holds gives a message; only a sandbox that cannot be
        set up (SandboxUnavailable) or a failure of this machine (OSError starting it) raises."""
        if call.name not in self.names:
            return f"error: no tool {call.name[:100]!r}; available: {sorted(self.names)}"
        key = "expression" if call.name == "calculator" else "code"
        arg = call.arguments.get(key)
        if not isinstance(arg, str):
            return f'error: {call.name} needs {{"{key}": "<string>"}}, got {sorted(map(str, call.arguments))[:10]}'
        if call.name == "calculator":
            try:  # off the event loop: vLLM keeps generating meanwhile
                return await asyncio.wait_for(asyncio.to_thread(calculate, arg), CALC_CALL_TIMEOUT_S)
            except TimeoutError:
                return f"error: the calculator took longer than {CALC_CALL_TIMEOUT_S:g} s"
        return (await asyncio.to_thread(self.sandbox.run, arg)).observation()

    async def step(self, text: str) -> StepResult:
        try:
            calls = parse_tool_calls(text)
        except ToolCallError as e:
            return StepResult(observation=[{"role": "tool", "content": f"error: {e}"}])
        if not calls:
            return StepResult(done=True)
        run, extra = calls[:self.cfg.max_calls], len(calls) - self.cfg.max_calls
        results = list(await asyncio.gather(*(self.call(c) for c in run)))
        if extra > 0:
            results.append(f"error: {extra} more tool call(s) not run: at most {self.cfg.max_calls} per turn")
        return StepResult(observation=[{"role": "tool", "content": r} for r in results])


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    where = f"rollout.episode.env_kwargs.{loc}"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key for ToolEnv; allowed: {sorted(ToolEnvConfig.model_fields)}"
    if err["type"] == "literal_error" and err["loc"][:1] == ("tools",):
        return f"{where}: unknown tool {err['input']!r}; built-in: {sorted(TOOL_SCHEMAS)}"
    return f"{where}: {err['msg']} (got {err['input']!r})"
