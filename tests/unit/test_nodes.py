"""core.nodes: where each actor runs, in the line `fleetrl train` prints at start."""

from fleetrl.core.nodes import placement, placement_line, this_node


def test_the_placement_line_groups_actors_by_node(monkeypatch):
    import ray


    infos = {"rollout-0": {"node_id": "fe4dd554aa", "node_ip": "10.0.0.6"},
             "rollout-1": {"node_id": "fe4dd554aa", "node_ip": "10.0.0.6"},
             "learner-rank-0": {"node_id": "abc4c83ebb", "node_ip": "10.0.0.7"},
             "old-worker": {"device": "cpu"}}  # an info without a node: left out, not guessed
    assert placement(infos)["learner-rank-0"] == "10.0.0.7 [abc4c83e]"
    assert placement_line(infos) == ("2 node(s): 10.0.0.6 [fe4dd554]: rollout-0, rollout-1; "
                                     "10.0.0.7 [abc4c83e]: learner-rank-0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert this_node() == {}  # outside Ray: nothing to report
