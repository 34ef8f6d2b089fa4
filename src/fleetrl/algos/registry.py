"""Registries of algorithms by name: a new estimator or loss is one file with one decorator.

A registry maps a name to a function plus optional metadata given at registration. Every module
of ``fleetrl.algos`` is imported when the package is (see ``__init__``), so a file that registers
itself is found without editing any list. Unknown names are errors that list the known ones and
suggest the closest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
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
# Advantage estimators: see fleetrl.algos.advantages for the call signature.
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
# Policy losses: fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, dual_clip, agg)
#   -> (loss 0-d tensor, stats {clip_frac, dual_clip_frac, approx_kl, ratio_mean, ratio_max}).
POLICY_LOSSES: Registry = Registry("policy loss")
# Offline (preference / feedback) losses, per example: see fleetrl.algos.preference.
PREFERENCE_LOSSES: Registry = Registry("preference loss")
