"""The critic: PPO's value model, trained by its own DeepSpeed ranks (Ray actors, like the policy).

The model is the LM with a one-output linear head on every position (transformers'
`*ForTokenClassification` with num_labels=1, no dropout, no bias). Started from a reward model (a
one-output `*ForSequenceClassification`), it takes the reward model's score head over unchanged, so
at the start its value at a sequence's last position is the reward model's score. Started from a
causal LM (the policy), the head is new (small random weights).

The critic is a learner rank (learner/rank.py: the same engine, ZeRO stages, accumulation and
checkpoints as the policy's) running `CriticObjective`: the value model in place of the LM and the
clipped value loss in place of the policy loss. `CriticGroup` runs one per rank as
`{prefix}critic-rank-{i}`.

Alignment, as for log-probs: values[:, t] belongs to token t and is the head's output at position
t-1, i.e. V(s_t), the value of the state in which token t is chosen (it sees tokens < t). So GAE's
V_{t+1} is the value after token t was chosen, and a row's values are 0 wherever token t or t-1 is
padding.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fleetrl.algos.value import value_loss
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.learner.engine import load_value_model
from fleetrl.learner.forward import align_values, token_values
from fleetrl.learner.group import LearnerGroup, rank_resources
from fleetrl.learner.objective import OBJECTIVES, Objective
from fleetrl.learner.policy import agg_units, check_shapes
from fleetrl.learner.rank import Learner

__all__ = ["CRITIC_TRAIN_KEYS", "CriticGroup", "CriticLearner", "CriticObjective", "align_values",
           "load_value_model"]

CRITIC_TRAIN_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_values", "returns")


@OBJECTIVES.register("critic", role="critic")
class CriticObjective(Objective):
    """Clipped value loss (fleetrl.algos.value.value_loss) of the value model; options: value_clip, agg."""

    model_kind = "value"
    train_keys = CRITIC_TRAIN_KEYS

    def __init__(self, models, learner_cfg: LearnerConfig | dict | None = None, options: Any = None,
                 **kw: Any):
        super().__init__(models, learner_cfg, options, **{"name": "critic", **kw})
        opts = dict(options or {})
        self.value_clip = opts.pop("value_clip", 0.2)
        self.agg = opts.pop("agg", "token-mean")
        if opts:
            raise ValueError(f"unknown critic options {sorted(opts)}; allowed: value_clip, agg")

    def info(self) -> dict[str, Any]:
        return {**super().info(), "role": "critic", "value_clip": self.value_clip}

    def check(self, batch: dict[str, torch.Tensor]) -> int:
        check_shapes(batch, self.train_keys)
        return batch["input_ids"].shape[0]

    def units(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        return agg_units(micro["loss_mask"].float() * micro["attention_mask"].float(), self.agg)

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        dev = self.device
        m = (micro["loss_mask"].float() * micro["attention_mask"].float()).to(dev)
        values = token_values(self.models.policy, micro["input_ids"], micro["attention_mask"], dev)
        returns = micro["returns"].to(dev).float()
        loss, st = value_loss(values, micro["old_values"].to(dev).float(), returns, m,
                              clip=self.value_clip, agg=self.agg)
        u = agg_units(m, self.agg).double().cpu()
        tok = m.sum().double().cpu()
        with torch.no_grad():
            stats.mean("value_loss", loss.detach().double().cpu() * u, u, empty=0.0)
            stats.mean("vf_clip_frac", st["vf_clip_frac"].double().cpu() * tok, tok, empty=0.0)
            stats.mean("values_mean", (values * m).sum().double().cpu(), tok, empty=0.0)
            stats.mean("value_mse", (((values - returns) ** 2) * m).sum().double().cpu(), tok, empty=0.0)
        return loss


def CriticLearner(cfg: LearnerConfig | dict, model_path: str | os.PathLike, *args: Any,  # noqa: N802
                  value_clip: float | None = 0.2, agg: str = "token-mean", **kwargs: Any) -> Learner:
    """A critic rank in-process: `Learner(..., objective="critic")` (for callers of the old class)."""
    return Learner(cfg, model_path, *args, objective="critic",
                   objective_cfg={"value_clip": value_clip, "agg": agg}, **kwargs)


class CriticGroup(LearnerGroup):
    """The critic's ranks as Ray actors `{name_prefix}critic-rank-{i}`; see LearnerGroup."""

    def __init__(
        self,
        critic_cfg: CriticConfig,
        policy_cfg: LearnerConfig,
        model_path: str | os.PathLike,
        total_steps: int | None = None,
        mini_batch_size: int | None = None,
        name_prefix: str = "",
        colocate_with: LearnerGroup | None = None,
        ready_timeout_s: float = 900.0,
        wait: bool = True,
    ):
        """`colocate_with` (the policy's group, built with `reserve=CriticGroup.reserve(...)`) puts
        critic rank i in policy rank i's bundle; None = a placement group of its own."""
        super().__init__(
            critic_cfg.learner_config(policy_cfg), model_path, total_steps=total_steps,
            mini_batch_size=mini_batch_size, name_prefix=name_prefix, ready_timeout_s=ready_timeout_s,
            learner_kwargs={"objective": "critic",
                            "objective_cfg": {"value_clip": critic_cfg.value_clip, "agg": critic_cfg.agg}},
            role="critic", colocate_with=colocate_with, wait=wait,
        )

    @staticmethod
    def reserve(critic_cfg: CriticConfig, policy_cfg: LearnerConfig) -> dict[str, float]:
        """What each policy bundle must hold on top of the policy rank for a colocated critic rank."""
        return rank_resources(critic_cfg.learner_config(policy_cfg))

    def compute_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] values (fp32, CPU), aligned with the tokens (see the module doc)."""
        n = batch["input_ids"].shape[0]
        if n == 0:
            return torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        shards = self._padded_shards(batch, ("input_ids", "attention_mask"))
        return torch.cat(self._gather([a.compute_values.remote(s) for a, s in zip(self.actors, shards)]))[:n]
