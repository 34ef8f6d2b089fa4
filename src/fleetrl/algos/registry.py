"""Registries of algorithms by name: a new estimator or loss is one file with one decorator.

A registry maps a name to a function plus optional metadata given at registration. Every module
of ``fleetrl.algos`` is imported when the package is (see ``__init__``), so a file that registers
itself is found without editing any list. Unknown names are errors that list the known ones and
suggest the closest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    fn: F
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """Named functions of one kind (e.g. "advantage estimator")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator: ``@REGISTRY.register("name", key=value)`` adds the function under ``name``."""

        def add(fn: F) -> F:
            if name in self._entries and self._entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._entries[name].fn.__module__} and {fn.__module__})")
            self._entries[name] = Entry(name, fn, dict(meta))
            return fn

        return add

    def entry(self, name: str) -> Entry[F]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}") from None

    def get(self, name: str) -> F:
        """The function registered as ``name``."""
        return self.entry(name).fn

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


# The registries. Each algorithm file registers itself into one of them.
# Advantage estimators, meta per_token=False: fn(rewards [N], group_size, **options) -> [N]
#   (fleetrl.algos.advantages); per_token=True: fn(scores [B], mask [B, T], *, kl, kl_coef, group_size,
#   values, gamma, lam) -> (advantages [B, T], returns [B, T]) (fleetrl.algos.token_advantages);
#   teacher=True: fn(student_logp, teacher_logp, mask, group_advantages, reward_weight) -> (advantages
#   [B, T], reverse_kl [B, T]) (fleetrl.algos.opd).
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
# Policy losses: fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip, agg)
#   -> (loss 0-d tensor, stats {clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max}).
POLICY_LOSSES: Registry = Registry("policy loss")
# Offline (preference / feedback) losses, per example: see fleetrl.algos.preference.
PREFERENCE_LOSSES: Registry = Registry("preference loss")


@dataclass(frozen=True)
class OnlineAlgorithm:
    """What an online algorithm is made of; the online loop reads nothing else about it.

    advantage: an ADVANTAGE_ESTIMATORS name; whether it is per-token (KL-shaped token rewards) or
    one value per sample from its group is the estimator's ``per_token`` meta.
    policy_loss: the POLICY_LOSSES name the learner optimizes (learner.loss.policy_loss's default).
    critic: a value model is trained next to the policy and gives values at sampling time.
    section: the run-config section with the algorithm's own settings (e.g. "ppo"), if any.
    objective: what the learner trains on: "policy" (the policy loss on advantages) or "pairs" (a
    pair loss of PREFERENCE_LOSSES on chosen/rejected pairs picked from each group, online DPO).
    defaults: {dotted run-config key: value} used when the config leaves the key unset, shown by
    ``fleetrl config show`` (e.g. GSPO's tiny clip range).
    """

    name: str
    advantage: str
    policy_loss: str = "ppo"
    critic: bool = False
    section: str | None = None
    objective: str = "policy"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def per_token(self) -> bool:
        return bool(ADVANTAGE_ESTIMATORS.meta(self.advantage).get("per_token", False))

    @property
    def teacher(self) -> bool:
        """Its advantage needs a frozen teacher's token log-probs (the run's ``teacher:`` service)."""
        return bool(ADVANTAGE_ESTIMATORS.meta(self.advantage).get("teacher", False))

    @property
    def min_group_size(self) -> int:
        return int(ADVANTAGE_ESTIMATORS.meta(self.advantage).get("min_group_size", 1))

    def config_defaults(self) -> dict[str, Any]:
        """The run-config keys this algorithm sets when the config leaves them unset (its policy
        loss when it is not learner.loss.policy_loss's own default, "ppo")."""
        loss = {} if self.policy_loss == "ppo" else {"learner.loss.policy_loss": self.policy_loss}
        return {**loss, **self.defaults}


# Online algorithms by name (the config's `algorithm:`); each registers next to its pieces.
ONLINE_ALGORITHMS: Registry = Registry("online algorithm")


def register_online_algorithm(algo: OnlineAlgorithm) -> OnlineAlgorithm:
    """Declare an online algorithm (its estimator and loss may live in files imported later)."""
    ONLINE_ALGORITHMS.register(algo.name)(algo)
    return algo


def check_online_algorithms() -> None:
    """Every online algorithm names a registered estimator and policy loss (run once all are in)."""
    for name in ONLINE_ALGORITHMS:
        algo = ONLINE_ALGORITHMS.get(name)
        for registry, key in ((ADVANTAGE_ESTIMATORS, algo.advantage), (POLICY_LOSSES, algo.policy_loss)):
            if key not in registry:
                raise KeyError(f"online algorithm {name!r} names {registry.kind} {key!r}, which is not "
                               f"registered; known: {', '.join(registry.names())}")
