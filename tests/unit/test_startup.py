"""Start-up bookkeeping of an online run (online/services.py): services waited for side by side,
progress printed as each is ready, the first failure raised; the process age behind time/startup."""

from __future__ import annotations

import threading
import time

import pytest

from fleetrl.online.services import process_age_s, wait_side_by_side


def test_waits_run_side_by_side_and_report_progress(capsys):
    release = threading.Event()

    def learner():
        return "learner-info"

    def fleet():
        # Returns only once the learner's wait has finished: with serial waits in this order
        # (fleet first) it would never be released.
        assert release.wait(timeout=30), "the learner's wait did not run while the fleet's was pending"
        return ["fleet-info"]

    waits = {"fleet": fleet, "learner": lambda: (learner(), release.set())[0]}
    out = wait_side_by_side(waits, time.perf_counter())
    assert out["learner"][1] == "learner-info" and out["fleet"][1] == ["fleet-info"]
    assert out["learner"][0] <= out["fleet"][0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fleetrl:")]
    assert len(lines) == 2
    assert any(ln.startswith("fleetrl: learner ready after") for ln in lines)
    assert any(ln.startswith("fleetrl: fleet ready after") for ln in lines)
    assert "(waiting for" in lines[0] and "(waiting for" not in lines[1]


def test_first_failure_is_raised_with_its_message():
    def broken():
        raise TimeoutError("rollout worker(s) [0] did not start within 5s (rollout.ready_timeout_s)")

    with pytest.raises(TimeoutError, match=r"rollout worker\(s\) \[0\] did not start"):
        wait_side_by_side({"fleet": broken, "learner": lambda: None}, time.perf_counter())


def test_process_age_is_positive_on_linux():
    age = process_age_s()
    assert age is not None and age > 0
