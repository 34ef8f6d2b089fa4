"""Objectives: what a learner rank optimizes, as a per-micro-batch loss plus its statistics.

A learner rank (learner/rank.py) is an engine (learner/engine.py: model, DeepSpeed, optimizer,
checkpoints, weight sync) + the one accumulation routine (learner/accumulate.py) + an objective.
An objective says which model it trains (`model_kind`), whether it needs the frozen reference,
which batch keys it reads, what its loss averages over (`units`) and the loss of one micro-batch
(`loss`), recording its statistics. It reaches the models only through `ModelAccess`, which the
engine implements and `LocalModels` implements with plain modules in one process (tests, tools).

Objectives are registered by name in `OBJECTIVES` ("policy", "critic", and the offline ones in
learner/offline.py; every pair loss of `fleetrl.algos.PREFERENCE_LOSSES` is an offline objective too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fleetrl.algos.registry import Registry
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.forward import Model

# name -> Objective subclass; meta: role (policy / critic / offline).
OBJECTIVES: Registry = Registry("learner objective")


class ModelAccess(Protocol):
    """The models an objective computes with, on one rank."""

    device: torch.device
    world_size: int

    @property
    def policy(self) -> Model: ...  # the trained model (a module, or the DeepSpeed engine wrapping it)
    def reference(self) -> Model: ...  # the frozen reference; raises when there is none
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...


@dataclass
class LocalModels:
    """`ModelAccess` over plain modules in this process (one rank): objectives without DeepSpeed."""

    policy: Model
    reference_model: Model | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_size: int = 1

    def reference(self) -> Model:
        if self.reference_model is None:
            raise ValueError("no reference model: pass LocalModels(policy, reference_model=...)")
        return self.reference_model

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t


class Objective:
    """Base of the objectives: keeps the models, the learner config and the objective's own options.

    Subclasses set `model_kind` ("causal_lm" | "value" | "score") and `train_keys`, and define
    `units` and `loss`; `check` and `finish` are optional.
    """

    model_kind: ClassVar[str] = "causal_lm"
    train_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "loss_mask")

    def __init__(self, models: ModelAccess, learner_cfg: LearnerConfig | dict | None = None,
                 options: Any = None, *, name: str | None = None, pad_token_id: int = 0,
                 max_length: int | None = None):
        self.models = models
        self.cfg = learner_cfg if isinstance(learner_cfg, LearnerConfig) \
            else LearnerConfig.model_validate(learner_cfg or {})
        self.name = name or type(self).__name__
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.options = options

    @classmethod
    def needs_reference(cls, name: str, learner_cfg: LearnerConfig) -> bool:
        """Whether the engine must load the frozen reference for this objective."""
        return False

    @classmethod
    def check_config(cls, name: str, learner_cfg: LearnerConfig) -> None:
        """Raise (before any model loads) when the learner config cannot run this objective."""

    def info(self) -> dict[str, Any]:
        return {"objective": self.name}

    @property
    def device(self) -> torch.device:
        return self.models.device

    def check(self, batch: dict[str, torch.Tensor]) -> int:
        """The batch's row count; raises naming what is missing or misshapen."""
        missing = [k for k in self.train_keys if k not in batch]
        if missing:
            raise KeyError(f"{self.name} batch is missing {missing}; it has {sorted(batch)}")
        key = self.train_keys[0]
        n = batch[key].shape[0]
        for k, v in batch.items():
            if v.shape[0] != n:
                raise ValueError(f"{self.name} batch[{k!r}] has {v.shape[0]} rows, {key} has {n}")
        return n

    def units(self, micro: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """What `loss` averages over in this micro-batch (tokens, sequences or examples)."""
        raise NotImplementedError

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **options: Any) -> torch.Tensor:
        """The micro-batch's loss, averaged over its own units; records its statistics in `stats`."""
        raise NotImplementedError

    def finish(self, out: dict[str, float]) -> dict[str, float]:
        """Last touches to the reduced statistics of a step (e.g. derived figures)."""
        return out
