"""Leaving a draining node (online/draining.py): which workers go, how long they get, what is handed back.

The fleet and collector here are stand-ins with the methods the drain uses; the real thing runs on a
multi-node cluster in tests/e2e/test_cluster_placement.py (a node drained through Ray mid-run).
"""

from __future__ import annotations

from types import SimpleNamespace

from fleetrl.online.draining import (
    DEADLINE_MARGIN_S,
    drain_budget_s,
    drain_leaving_workers,
    leaving,
    rank_nodes,
)


def test_drain_budget_is_the_deadline_less_a_margin_within_the_generate_timeout():
    assert drain_budget_s(0.0, timeout_s=120.0, now=1000.0) == 120.0  # no deadline given
    assert drain_budget_s(1000.0 + 60.0, timeout_s=120.0, now=1000.0) == 60.0 - DEADLINE_MARGIN_S
    assert drain_budget_s(1000.0 + 600.0, timeout_s=120.0, now=1000.0) == 120.0
    assert drain_budget_s(1000.0 + 1.0, timeout_s=120.0, now=1000.0) == 0.0  # too late: hand everything back


def test_which_actors_are_leaving():
    draining = {"nodeA": 0.0}
    assert leaving({0: "nodeA", 1: "nodeB", 2: None}, draining) == {0: "nodeA"}
    policy = SimpleNamespace(rank_names=lambda: ["r/learner-rank-0", "r/learner-rank-1"],
                             rank_info=[{"node_id": "nodeB"}, {"node_id": "nodeA"}])
    critic = SimpleNamespace(rank_names=lambda: ["r/critic-rank-0"], rank_info=[{"node_id": "nodeA"}])
    ranks = rank_nodes(policy, None, critic)
    assert leaving(ranks, draining) == {"r/learner-rank-1": "nodeA", "r/critic-rank-0": "nodeA"}
    assert leaving(ranks, {}) == {}


class _Fleet:
    def __init__(self, nodes, inflight, finishes):
        self.cfg = SimpleNamespace(generate_timeout_s=120.0)
        self.nodes, self.inflight, self.finishes = nodes, inflight, finishes
        self.removed = []

    def indices(self):
        return sorted(self.nodes)

    def node_of(self, index):
        return self.nodes[index]

    def inflight_of(self, index):
        return self.inflight[index]

    def remove_worker(self, index, wait, timeout_s):
        assert wait, "a leaving worker is let finish, never killed mid-call"
        self.removed.append((index, timeout_s))
        del self.nodes[index]
        return [f"call-{index}-{k}" for k in range(self.inflight[index] - self.finishes[index])]


def test_workers_on_a_draining_node_leave_and_hand_back_what_they_did_not_finish(capsys):
    fleet = _Fleet({0: "nodeA", 1: "nodeB", 2: "nodeA"}, inflight={0: 3, 1: 2, 2: 1}, finishes={0: 1, 1: 2, 2: 1})
    collector = SimpleNamespace(requeued=[], workers_drained=0)
    collector.requeue = collector.requeued.extend

    assert drain_leaving_workers(fleet, collector, {"nodeA": 0.0}) == [0, 2]
    assert fleet.removed == [(0, 120.0), (2, 120.0)] and fleet.indices() == [1]
    assert collector.requeued == ["call-0-0", "call-0-1"] and collector.workers_drained == 2
    out = capsys.readouterr().out
    assert "fleetrl: node nodeA is draining: rollout worker 0 left after finishing 1 of its 3 generate call(s) " \
           "(within 120s); 2 handed back to the other workers" in out, out
    # Nothing draining: nothing moves.
    assert drain_leaving_workers(fleet, collector, {}) == [] and fleet.indices() == [1]
