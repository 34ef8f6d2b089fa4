"""Threads of a CPU learner rank: torch and OpenMP both get the rank's CPU share (or learner.num_threads)."""

import pytest

from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.group import learner_env


@pytest.mark.parametrize(("cfg", "threads"), [
    ({}, 1), ({"num_cpus_per_rank": 4}, 4), ({"num_cpus_per_rank": 0.5}, 1), ({"num_cpus_per_rank": 2.6}, 3),
    ({"num_cpus_per_rank": 4, "num_threads": 2}, 2),
])
def test_threads_follow_the_rank_share(cfg, threads):
    c = LearnerConfig.model_validate(cfg)
    assert c.cpu_threads() == threads
    assert learner_env(c, 0)["OMP_NUM_THREADS"] == str(threads)


def test_bad_thread_count_names_the_key():
    with pytest.raises(ValueError, match="num_threads"):
        LearnerConfig.model_validate({"num_threads": 0})
