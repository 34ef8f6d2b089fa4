"""Waiting on Ray calls with a deadline: fail on the first error, name whoever is late.

Every wait of the package on a remote call has a deadline (tests/unit/test_waits.py scans the
source for waits without one). ``wait_all`` is the common shape: the answers of a set of calls in
order, the first failure raised as soon as it arrives (the others may be waiting on the failed
one, as ranks in a collective do), and a TimeoutError naming the calls still out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class WaitTimeout(TimeoutError):
    """Calls that did not answer by their deadline; ``late`` names them."""

    def __init__(self, message: str, late: list[str]):
        super().__init__(message)
        self.late = late


def wait_all(refs: Sequence, names: Sequence[str], timeout_s: float, what: str,
             hint: str | Callable[[], str] = "") -> list:
    """The results of ``refs`` in order, within ``timeout_s`` for all of them together.

    ``names[i]`` says who answers ``refs[i]`` (e.g. "reward actor reward-0"); ``what`` what the
    calls do, and ``hint`` what to change (or a function that says it, called only on a timeout),
    for the TimeoutError. A call that failed raises its own
    error at once, without waiting for the others.
    """
    import ray

    refs = list(refs)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            late = [names[refs.index(r)] for r in pending]
            hint = hint() if callable(hint) else hint
            raise WaitTimeout(
                f"{what}: no answer within {timeout_s:g}s from {', '.join(late)}" + (f". {hint}" if hint else ""),
                late)
        ray.get(done[0])  # ready: raises the call's own error if it failed
    return ray.get(refs)  # all ready
