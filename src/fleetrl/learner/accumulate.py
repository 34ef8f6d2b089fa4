"""The one micro-batch accumulation routine every objective trains through, and its statistics.

`optimizer_step(engine, micro_batches, objective)` runs one optimizer step of this rank: each
micro-batch's loss (the objective's mean over its own units) is weighted by the micro-batch's share
of the GLOBAL mini-batch's units (tokens, sequences or examples, as the objective says), so
accumulation plus DeepSpeed's mean over ranks and micro-steps yields exactly the loss averaged over
the whole mini-batch of all ranks. DeepSpeed updates at the last micro-batch; the statistics the
objective recorded are all-reduced, so every rank returns the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

AllReduce = Callable[..., torch.Tensor]  # (tensor, op="sum" | "max") -> tensor summed / maxed over ranks


class Stats:
    """Statistics of one optimizer step, kept as sums so they reduce exactly over micro-batches and ranks.

    - `mean(key, total, count)`: reported as sum(total) / sum(count) over all ranks (`empty` when
      the count is 0).
    - `examples({key: [b] tensor}, select)`: per-example means (of the selected examples).
    - `sum(key, value)`: reported as the sum over all ranks.
    - `max(key, value)`: reported as the max over all ranks.
    Every rank must record the same keys (true when they run the same objective): the reduced
    tensors line up by sorted key.
    """

    def __init__(self) -> None:
        self.means: dict[str, list[float]] = {}
        self.empty: dict[str, float] = {}
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def mean(self, key: str, total: torch.Tensor | float, count: torch.Tensor | float,
             empty: float = math.nan) -> None:
        cur = self.means.setdefault(key, [0.0, 0.0])
        cur[0] += float(total)
        cur[1] += float(count)
        self.empty[key] = empty

    def examples(self, stats: dict[str, torch.Tensor], select: torch.Tensor | None = None) -> None:
        for key, v in stats.items():
            v = v.detach().double().cpu()
            if select is None:
                self.mean(key, v.sum(), v.numel())
            else:
                self.mean(key, v[select].sum(), select.sum())

    def sum(self, key: str, value: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def max(self, key: str, value: torch.Tensor | float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), float(value))

    def reduce(self, all_reduce: AllReduce) -> dict[str, float]:
        means, sums, maxes = sorted(self.means), sorted(self.sums), sorted(self.maxes)
        flat = torch.tensor([v for k in means for v in self.means[k]] + [self.sums[k] for k in sums],
                            dtype=torch.float64)
        if flat.numel():
            flat = all_reduce(flat)
        out = {}
        for i, k in enumerate(means):
            total, count = float(flat[2 * i]), float(flat[2 * i + 1])
            out[k] = total / count if count > 0 else self.empty[k]
        out.update({k: float(flat[2 * len(means) + i]) for i, k in enumerate(sums)})
        if maxes:
            peak = all_reduce(torch.tensor([self.maxes[k] for k in maxes], dtype=torch.float64), op="max")
            out.update({k: float(peak[i]) for i, k in enumerate(maxes)})
        return out


class Steppable(Protocol):
    """What the accumulation routine needs from an engine (see learner/engine.py)."""

    world_size: int
    grad_accum: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    def lr(self) -> float: ...
    def train_mode(self) -> None: ...
    def backward_step(self, loss: torch.Tensor, last: bool) -> float | None: ...
    def grad_norm(self, own_norm: float | None) -> float: ...


class Trainable(Protocol):
    """What the accumulation routine needs from an objective (see learner/objective.py)."""

    def units(self, micro: dict[str, torch.Tensor]) -> torch.Tensor | float: ...
    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **options: Any) -> torch.Tensor: ...
    def finish(self, out: dict[str, float]) -> dict[str, float]: ...


def optimizer_step(engine: Steppable, micro_batches: Sequence[dict[str, torch.Tensor]], objective: Trainable,
                   **options: Any) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's statistics (same on every
    rank): the objective's own, grad_norm (before clipping) and lr. `options` go to objective.loss."""
    engine.train_mode()
    units = [float(objective.units(m)) for m in micro_batches]
    units_total = float(engine.all_reduce(torch.tensor([sum(units)], dtype=torch.float64))[0])
    scale = engine.world_size * engine.grad_accum
    lr = engine.lr()
    stats = Stats()
    own_norm = None
    for k, micro in enumerate(micro_batches):
        loss = objective.loss(micro, stats, **options)
        weight = units[k] / units_total * scale if units_total > 0 else 0.0
        norm = engine.backward_step(loss * weight, last=k == len(micro_batches) - 1)
        own_norm = norm if norm is not None else own_norm
    out = stats.reduce(engine.all_reduce)
    out.update({"grad_norm": engine.grad_norm(own_norm), "lr": lr})
    return objective.finish(out)
