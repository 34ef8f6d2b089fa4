"""The buffer between the rollout fleet and the learner: scored groups under a staleness bound.

Versions: the learner's weights start at version 0 and step s (0-based) turns version s into
s + 1. A group records the OLDEST weight version any of its tokens was sampled with
(``Group.min_version``); trained at step s its staleness is ``s - min_version``. With
``max_staleness`` K nothing staler than K is ever trained: such a group is dropped and counted,
and its prompt goes back to be generated again (nothing lost, nothing trained twice).

``Admission`` decides when the collector may start a prompt: the g-th group of the run
(0-based) belongs to step g // prompts_per_step and may start once the fleet holds version
>= that step - K. K = 0 is the synchronous loop: a step's prompts start only under the weights
that step trains. Admission keeps the fleet at most K steps ahead; the buffer's check is the
guarantee (a group can still age past K, e.g. when a step drops groups and waits for more).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

G = TypeVar("G")


@dataclass
class Admission:
    """How far ahead of the learner the collector may start prompts."""

    max_staleness: int
    prompts_per_step: int
    started: int = 0  # groups started so far in this run (the next group's index)

    def allowed(self, fleet_version: int) -> int:
        """How many more groups may start now, with the fleet at ``fleet_version``."""
        limit = (fleet_version + self.max_staleness + 1) * self.prompts_per_step
        return max(0, limit - self.started)

    def start(self, k: int = 1) -> None:
        self.started += k

    def give_back(self, k: int = 1) -> None:
        """Groups that were dropped (too stale): their prompts start again, within the same budget."""
        self.started -= k


@dataclass
class TakeResult(Generic[G]):
    groups: list[G]
    dropped: list[G] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)  # of each group taken, in order


class StalenessBuffer(Generic[G]):
    """Scored groups; ``take`` never returns one staler than ``max_staleness``."""

    def __init__(self, max_staleness: int, version_of: Callable[[G], int]):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self._version_of = version_of
        self._groups: deque[G] = deque()

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, groups: Iterable[G]) -> None:
        self._groups.extend(groups)

    def drop_stale(self, learner_version: int) -> list[G]:
        """Remove and return every group too stale to train at ``learner_version``."""
        keep, dropped = deque(), []
        for g in self._groups:
            (dropped if learner_version - self._version_of(g) > self.max_staleness else keep).append(g)
        self._groups = keep
        return dropped

    def take(self, n: int, learner_version: int) -> TakeResult[G]:
        """Up to ``n`` groups trainable at ``learner_version``, oldest weights first (those closest to
        the bound: a group that finished late is not left to expire behind newer ones; among equal
        versions, the order they arrived in). Stale ones are dropped."""
        dropped = self.drop_stale(learner_version)
        order = sorted(range(len(self._groups)), key=lambda i: self._version_of(self._groups[i]))
        chosen = set(order[:n])
        taken = [g for i, g in enumerate(self._groups) if i in chosen]
        taken.sort(key=self._version_of)
        self._groups = deque(g for i, g in enumerate(self._groups) if i not in chosen)
        return TakeResult(taken, dropped, [learner_version - self._version_of(g) for g in taken])

    def peek_all(self) -> list[G]:
        """The groups held, oldest first (for checkpoints)."""
        return list(self._groups)
