"""The staleness bound and exactly-once training, under adversarial generation timings (no Ray)."""

import random
from dataclasses import dataclass

import pytest

from fleetrl.online.buffer import Admission, StalenessBuffer


@dataclass
class FakeGroup:
    prompt: int
    min_version: int


def test_take_prefers_the_oldest_weights_then_arrival_order():
    buf = StalenessBuffer(max_staleness=3, version_of=lambda g: g.min_version)
    buf.put([FakeGroup(0, 2), FakeGroup(1, 1), FakeGroup(2, 2), FakeGroup(3, 1)])
    out = buf.take(3, learner_version=3)
    assert [g.prompt for g in out.groups] == [1, 3, 0] and out.staleness == [2, 2, 1]
    assert [g.prompt for g in buf.peek_all()] == [2]


def test_take_drops_what_is_too_stale_and_keeps_order():
    buf = StalenessBuffer(max_staleness=1, version_of=lambda g: g.min_version)
    buf.put([FakeGroup(0, 0), FakeGroup(1, 2), FakeGroup(2, 1), FakeGroup(3, 3)])
    out = buf.take(2, learner_version=3)
    assert [g.prompt for g in out.dropped] == [0, 2]  # 3 - 0 = 3 > 1, 3 - 1 = 2 > 1
    assert [g.prompt for g in out.groups] == [1, 3] and out.staleness == [1, 0]
    assert len(buf) == 0


def test_k0_is_the_synchronous_loop():
    adm = Admission(max_staleness=0, prompts_per_step=4)
    assert adm.allowed(fleet_version=0) == 4
    adm.start(4)
    assert adm.allowed(0) == 0  # step 1's prompts wait for version 1
    assert adm.allowed(1) == 4


def test_admission_gives_back_dropped_groups():
    adm = Admission(max_staleness=2, prompts_per_step=3)
    adm.start(adm.allowed(0))
    assert adm.started == 9 and adm.allowed(0) == 0
    adm.give_back(2)
    assert adm.allowed(0) == 2


def test_negative_staleness_is_refused():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        StalenessBuffer(-1, version_of=lambda g: 0)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_bound_holds_and_every_prompt_trains_once_under_random_timings(k, seed):
    """A simulated fleet: groups start when admitted (recording the fleet's version), take random
    times (some very long, so they age past K) and a weight update may land mid-generation, which
    lowers nothing: a group keeps the version it started with (its oldest token)."""
    rng = random.Random(seed * 10 + k)
    per_step, steps = 4, 12
    adm = Admission(k, per_step)
    buf = StalenessBuffer(k, version_of=lambda g: g.min_version)
    prompts = iter(range(10_000))
    retry: list[int] = []
    running: list[tuple[float, FakeGroup]] = []  # (finish time, group)
    now, version = 0.0, 0
    trained: list[int] = []
    dropped_total = 0
    for step in range(steps):
        need = per_step
        batch = []
        while need:
            for _ in range(adm.allowed(version)):
                adm.start()
                prompt = retry.pop(0) if retry else next(prompts)
                slow = rng.random() < 0.2
                running.append((now + rng.uniform(0.1, 1.0) * (20 if slow else 1), FakeGroup(prompt, version)))
            running.sort(key=lambda x: x[0])
            if running:
                now, group = running.pop(0)
                buf.put([group])
            out = buf.take(need, learner_version=step)
            assert all(s <= k for s in out.staleness), out.staleness
            for g in out.dropped:
                retry.append(g.prompt)
                adm.give_back()
            dropped_total += len(out.dropped)
            batch.extend(out.groups)
            need -= len(out.groups)
        trained.extend(g.prompt for g in batch)
        version = step + 1  # the sync: the fleet now holds the new weights
    assert len(trained) == len(set(trained)) == steps * per_step  # nothing trained twice
    pending = [g.prompt for _, g in running] + [g.prompt for g in buf.peek_all()] + retry
    started = set(trained) | set(pending)
    assert started == set(range(len(started)))  # nothing lost: every prompt drawn is trained or pending
    if k == 0:
        assert dropped_total == 0  # the synchronous loop never trains or wastes stale work
