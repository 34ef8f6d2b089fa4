"""The critic: PPO's value model, trained by its own DeepSpeed ranks (Ray actors, like the policy).

The model is the LM with a one-output linear head on every position (transformers'
`*ForTokenClassification` with num_labels=1, no dropout, no bias). Started from a reward model (a
one-output `*ForSequenceClassification`), it takes the reward model's score head over unchanged, so
at the start its value at a sequence's last position is the reward model's score. Started from a
causal LM (the policy), the head is new (small random weights).

`CriticLearner` is a `PolicyLearner` (same DeepSpeed engine building, ZeRO stages, micro-batch
accumulation, checkpoints) with the value model in place of the LM and the clipped value loss in
place of the policy loss. `CriticGroup` runs one per rank as `{prefix}critic-rank-{i}`.

Alignment, as for log-probs: values[:, t] belongs to token t and is the head's output at position
t-1, i.e. V(s_t), the value of the state in which token t is chosen (it sees tokens < t). So GAE's
V_{t+1} is the value after token t was chosen, and a row's values are 0 wherever token t or t-1 is
padding.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from fleetrl.algos.losses import value_loss
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.critic_config import CriticConfig
from fleetrl.learner.group import LearnerGroup, rank_resources
from fleetrl.learner.policy import PolicyLearner, _agg_units

CRITIC_TRAIN_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_values", "returns")


def load_value_model(path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The value model from a reward model or causal LM checkpoint at `path` (see the module doc)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    # Regression targets: dropout would only add noise to the values; no bias, like a reward head,
    # so a reward model's `score.weight` is the whole head.
    config.classifier_dropout = 0.0
    config.token_classification_bias = False
    return AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype)


def align_values(head_out: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position head outputs [B, T] -> values aligned with tokens [B, T].

    out[:, t] = head_out[:, t-1] where token t and token t-1 are real; 0 elsewhere (column 0,
    padding, the first real token of a left-padded row).
    """
    if head_out.shape != attention_mask.shape:
        raise ValueError(f"head outputs {tuple(head_out.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be [batch, tokens]")
    real = attention_mask.bool()
    has_ctx = real & F.pad(real, (1, 0))[:, :-1]
    shifted = F.pad(head_out, (1, 0))[:, :-1]
    return torch.where(has_ctx, shifted, torch.zeros((), dtype=head_out.dtype, device=head_out.device))


class CriticLearner(PolicyLearner):
    """One DeepSpeed rank of the critic. Every rank calls every method in the same order."""

    def __init__(
        self,
        cfg: LearnerConfig | dict,
        model_path: str | os.PathLike,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        total_steps: int | None = None,
        mini_batch_size: int | None = None,
        local_rank: int | None = None,
        *,
        value_clip: float | None = 0.2,
        agg: str = "token-mean",
    ):
        """`cfg`: the critic's engine settings (CriticConfig.learner_config). No reference model is
        loaded whatever cfg.reference says. `value_clip` / `agg`: see fleetrl.algos.losses.value_loss."""
        cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        self.value_clip, self.agg = value_clip, agg
        super().__init__(cfg.model_copy(update={"reference": False}), model_path, rank, world_size,
                         master_addr, master_port, total_steps, mini_batch_size, local_rank)

    def _load_model(self, path: str) -> torch.nn.Module:
        return load_value_model(path, self.dtype)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "role": "critic", "value_clip": self.value_clip}

    def _values(self, fn, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Aligned values [b, T] (fp32, on the device) of one micro-batch."""
        b, T = ids.shape
        inputs = self._model_inputs(ids, attn)
        if inputs is None:
            return torch.zeros(b, T, device=self.device)
        lo, hi, kwargs, attn_t = inputs
        head = fn(**kwargs).logits[..., 0].float()
        return F.pad(align_values(head, attn_t), (lo, T - hi))

    @torch.no_grad()
    def compute_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values [B, T] (fp32, CPU) of `batch` under the current critic (0 where a token has no context)."""
        self._check_batch(batch, ("input_ids", "attention_mask"))
        ids, attn = batch["input_ids"], batch["attention_mask"]
        mb = self.cfg.micro_batch_size
        self.engine.eval()
        out = [self._values(self.engine, ids[i : i + mb], attn[i : i + mb]).cpu() for i in range(0, ids.shape[0], mb)]
        self.engine.train()
        return torch.cat(out) if out else torch.zeros(ids.shape, dtype=torch.float32)

    def train(
        self,
        batch: dict[str, torch.Tensor],
        mini_batch_size: int,
        epochs: int = 1,
        temperature: float = 1.0,
    ) -> list[dict[str, float]]:
        """Value-loss updates: one optimizer step per mini-batch per epoch (the policy's signature;
        `temperature` is unused). `batch` holds CRITIC_TRAIN_KEYS; `old_values` are the values at
        sampling time, `returns` the regression targets, `loss_mask` the tokens that count."""
        self._check_train_batch(batch, mini_batch_size, CRITIC_TRAIN_KEYS)
        return self._mini_batch_steps(batch, epochs, self._value_step)

    def _value_step(self, mini: dict[str, torch.Tensor]) -> dict[str, float]:
        mask = mini["loss_mask"].float() * mini["attention_mask"].float()
        # Weighted like the policy's step: accumulation + DeepSpeed's mean over ranks and micro-steps
        # yield exactly the aggregate over the whole global mini-batch.
        totals = self._all_reduce(torch.stack([_agg_units(mask, self.agg), mask.sum()]))
        units_total, tokens_total = float(totals[0]), float(totals[1])
        scale = self.world_size * self.grad_accum
        lr = float(self.engine.get_lr()[0])
        sums = torch.zeros(4, dtype=torch.float64)  # loss * units, clip frac, value, squared error (per token)
        own_norm = None
        mb = self.cfg.micro_batch_size
        for i in range(0, self.mini_per_rank, mb):
            m = mask[i : i + mb].to(self.device)
            values = self._values(self.engine, mini["input_ids"][i : i + mb], mini["attention_mask"][i : i + mb])
            returns = mini["returns"][i : i + mb].to(self.device).float()
            loss, st = value_loss(values, mini["old_values"][i : i + mb].to(self.device).float(), returns, m,
                                  clip=self.value_clip, agg=self.agg)
            units = _agg_units(m, self.agg)
            weight = float(units) / units_total * scale if units_total > 0 else 0.0
            norm = self._backward_step(loss * weight, last=i + mb >= self.mini_per_rank)
            own_norm = norm if norm is not None else own_norm
            tok = m.sum().double().cpu()
            with torch.no_grad():
                sums[0] += loss.detach().double().cpu() * units.double().cpu()
                sums[1] += st["vf_clip_frac"].double().cpu() * tok
                sums[2] += (values * m).sum().double().cpu()
                sums[3] += (((values - returns) ** 2) * m).sum().double().cpu()
        sums = self._all_reduce(sums)
        u_div, t_div = max(units_total, 1e-12), max(tokens_total, 1e-12)
        return {
            "value_loss": float(sums[0]) / u_div,
            "vf_clip_frac": float(sums[1]) / t_div,
            "values_mean": float(sums[2]) / t_div,
            "value_mse": float(sums[3]) / t_div,
            "grad_norm": self._grad_norm(own_norm),
            "lr": lr,
        }


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
            learner_cls=CriticLearner, learner_kwargs={"value_clip": critic_cfg.value_clip, "agg": critic_cfg.agg},
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
