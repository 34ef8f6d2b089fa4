"""Every wait has a deadline: the package's source is scanned for waits without one.

A wait on a remote call with no timeout turns one stuck actor into a run that hangs forever
with nothing in the logs. The scan (``ast``, no imports) looks at every ``ray.get``,
``ray.wait``, ``asyncio.wait`` and ``<queue>.get`` call under src/fleetrl and fails on one with no
timeout (or ``timeout=None``), unless ALLOWED below lists it with the reason it cannot hang.
Also here: ``core.waits.wait_all``, the common bounded wait, against real Ray.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "fleetrl"

_READY = "the refs are ready: a ray.wait with a deadline returned them just before"
# (file under src/fleetrl, enclosing function, the call as ast.unparse writes it) -> why it cannot hang.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("core/waits.py", "wait_all", "ray.get(done[0])"): _READY,
    ("core/waits.py", "wait_all", "ray.get(refs)"): _READY + " (the loop ends when none is pending)",
    ("online/collect.py", "GroupCollector._on_scored", "ray.get(ref)"): _READY + " (_wait_once)",
    ("online/collect.py", "GroupCollector.pump", "ray.get(ref)"): _READY + " (_wait_once)",
    ("online/weights.py", "WeightSync._wait", "ray.get(r)"): _READY + " (every learner ref answered)",
    ("online/weights.py", "WeightSync._wait", "ray.get(list(names))"): _READY + " (none is late)",
    ("online/weights.py", "_died", "ray.get(ref)"): "called on finished refs only (WeightSync._wait)",
    ("rollout/fleet.py", "RolloutFleet.wait_ready", "ray.get(list(pings))"): _READY + " (none is late)",
    ("rollout/fleet.py", "RolloutFleet.remove_dead_workers", "ray.get(ref)"): _READY + " (answered)",
    ("rollout/fleet.py", "RolloutFleet.finish", "self.book.finish(ref, ray.get)"): "finish() takes a ref "
    "that ray.wait returned (the collector's and the evaluation's waits)",
}


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def unbounded_waits(source: str, filename: str = "<src>") -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) of every wait in ``source`` with no deadline."""
    tree = ast.parse(source, filename)
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope + [child.name] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.ClassDef)) else scope
            if isinstance(child, ast.Call) and _is_unbounded(child):
                found.append((".".join(scope) or "<module>", child.lineno, _name(child)))
            elif isinstance(child, ast.Call):  # ray.get handed over as a function: called without a deadline
                for arg in [*child.args, *(k.value for k in child.keywords)]:
                    if _name(arg) in ("ray.get", "ray.wait"):
                        found.append((".".join(scope) or "<module>", child.lineno, _name(child)))
            visit(child, inner)

    visit(tree, [])
    return found


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _none(node: ast.expr | None) -> bool:
    return node is None or (isinstance(node, ast.Constant) and node.value is None)


def _is_unbounded(call: ast.Call) -> bool:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return False
    owner = _name(func.value)
    if owner == "ray" and func.attr in ("get", "wait"):
        return _none(_kw(call, "timeout"))
    if owner == "asyncio" and func.attr == "wait":
        return _none(_kw(call, "timeout"))
    if owner == "asyncio" and func.attr == "wait_for":  # wait_for(aw, timeout): timeout is required
        return _none(_kw(call, "timeout")) and (len(call.args) < 2 or _none(call.args[1]))
    if func.attr == "get" and owner.split(".")[-1].lower().endswith(("queue", "q")):
        block = _kw(call, "block")
        non_blocking = isinstance(block, ast.Constant) and block.value is False
        positional = call.args[1] if len(call.args) > 1 else None  # get(block, timeout)
        return not non_blocking and _none(_kw(call, "timeout")) and _none(positional) and not (
            call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value is False)
    return False


def _scan_package() -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for scope, line, call in unbounded_waits(path.read_text(), str(path)):
            out.setdefault((rel, scope, call), line)
    return out


def test_every_wait_in_the_package_has_a_deadline():
    found = _scan_package()
    new = {k: line for k, line in found.items() if k not in ALLOWED}
    assert not new, (
        "waits without a deadline (pass timeout=..., or use fleetrl.core.waits.wait_all; if one truly "
        "cannot hang, add it to ALLOWED with the reason):\n"
        + "\n".join(f"  src/fleetrl/{f}:{line} in {scope}: {call}" for (f, scope, call), line in new.items()))


def test_the_allow_list_has_no_stale_entries():
    found = _scan_package()
    stale = [k for k in ALLOWED if k not in found]
    assert not stale, f"ALLOWED lists waits the package no longer has (remove them): {stale}"


def test_the_scan_finds_each_kind_of_unbounded_wait():
    source = '''
import asyncio, queue, ray

def f(refs, q, work_queue):
    ray.get(refs)
    ray.get(refs, timeout=None)
    ray.wait(refs, num_returns=1)
    asyncio.wait(refs)
    asyncio.wait_for(refs)
    q.get()
    work_queue.get(True)
    ray.get(refs, timeout=5)
    ray.wait(refs, timeout=t)
    asyncio.wait(refs, timeout=1)
    asyncio.wait_for(refs, 3)
    q.get(timeout=1)
    q.get(block=False)
    work_queue.get(True, 2)
    config.get("key")
    book.finish(ref, ray.get)

class C:
    async def m(self):
        await asyncio.wait(self.tasks)
'''
    found = unbounded_waits(source)
    assert [(scope, call) for scope, _, call in found] == [
        ("f", "ray.get(refs)"), ("f", "ray.get(refs, timeout=None)"), ("f", "ray.wait(refs, num_returns=1)"),
        ("f", "asyncio.wait(refs)"), ("f", "asyncio.wait_for(refs)"), ("f", "q.get()"),
        ("f", "work_queue.get(True)"), ("f", "book.finish(ref, ray.get)"), ("C.m", "asyncio.wait(self.tasks)")]


# ---------------------------------------------------------------- the common bounded wait, on real Ray


def test_wait_all_names_the_late_and_raises_the_first_failure_at_once(ray_local):
    import ray

    from fleetrl.core.waits import WaitTimeout, wait_all

    @ray.remote
    def answer(x):
        return x

    @ray.remote
    def stall():
        time.sleep(3600)

    @ray.remote
    def fail():
        raise ValueError("rank 1 broke")

    ray.get([answer.remote(0) for _ in range(3)], timeout=120)  # task workers up before the deadlines below
    assert wait_all([answer.remote(1), answer.remote(2)], ["a", "b"], 60, "adding") == [1, 2]
    stalled = stall.remote()
    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"^summing: no answer within 2s from rank 1\. check rank 1$") as err:
        wait_all([answer.remote(0), stalled], ["rank 0", "rank 1"], 2, "summing", lambda: "check rank 1")
    assert err.value.late == ["rank 1"]
    assert time.monotonic() - start < 30
    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 broke"):  # not after the stalled one's deadline
        wait_all([stalled, fail.remote()], ["rank 0", "rank 1"], 600, "summing")
    assert time.monotonic() - start < 30
    ray.cancel(stalled, force=True)
