"""Offline trainers as learner objectives: SFT, reward model, pair losses (DPO/cDPO, IPO, ORPO, SimPO,
...), KTO, offline PPO.

Each is an `Objective` (learner/objective.py) registered by its algorithm's name; a learner rank
(learner/rank.py) runs it with one optimizer step per `train_step`; `OfflineLearnerGroup` runs one
rank per Ray actor. Every pair loss registered in `fleetrl.algos.PREFERENCE_LOSSES` is trained by
`PairObjective` with no code here: adding one is its algos file and its config section. The losses
are pure functions (fleetrl.algos); this file builds their inputs from batches and records their
statistics, which learner/accumulate.py reduces exactly over micro-batches and ranks.

Batch layouts (CPU tensors, rows right-padded, prompt tokens then completion tokens):
- sft:  input_ids, attention_mask, loss_mask [B, T] (+ position_ids for packed rows)
- kto:  input_ids, attention_mask, loss_mask [B, T], desirable [B] bool
        (+ ref_logps, ref_kl_logps [B] when precomputed; + weight [B], each example's loss weight)
- offline_ppo: as kto (+ old_logprobs [B, T], the reference's token log-probs, when precomputed)
- rm and pair losses: chosen_input_ids, chosen_attention_mask, chosen_loss_mask, and the same
        three for rejected, all [B, T] with one T (+ ref_chosen_logps, ref_rejected_logps [B]
        when precomputed; + margin [B] for rm)
`loss_mask` marks the completion tokens whose log-probs make a sequence's log-prob.

What the offline driver (offline/loop.py) needs to know of an objective is on its class:
`reference_inputs(name)` (which precomputed reference values its batches carry: None, "pair",
"kto" or "tokens") and `evaluation` (how held-out data is scored: "nll", "scores" or "pairs").
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from fleetrl.algos.preference import (
    kto_loss,
    kto_reference_point,
    kto_shifted_pairs,
    offline_binary_ppo_loss,
    pairwise_reward_loss,
)
from fleetrl.algos.reduce import masked_sum
from fleetrl.algos.registry import PREFERENCE_LOSSES
from fleetrl.learner.accumulate import Stats
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.forward import sequence_logps, sequence_scores, token_logps
from fleetrl.learner.group import LearnerGroup, _split_rows
from fleetrl.learner.objective import OBJECTIVES, Objective
from fleetrl.learner.offline_config import OFFLINE_TABLE, algorithm_config
from fleetrl.learner.rank import Learner, objective_class

__all__ = ["OfflineLearner", "OfflineLearnerGroup", "PairObjective", "algorithm_config",
           "kto_mismatched_rows", "offline_ppo_losses", "pad_to_width", "preference_losses",
           "reward_model_losses"]

_SIDES = ("chosen", "rejected")
_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")
PAIR_KEYS = tuple(f"{s}_{k}" for s in _SIDES for k in _ROW_KEYS)


# ---------------------------------------------------------------------------------------------
# pure pieces (no DeepSpeed): KTO's mismatched pairs, the preference losses with their statistics
# ---------------------------------------------------------------------------------------------


def kto_mismatched_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    pad_token_id: int = 0,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """KTO's KL rows of one micro-batch: row i = prompt of example i + completion of example (i+1) mod m.

    The prompt of a row is its real tokens outside `loss_mask`, the completion its real tokens in
    it (prompt first). Returns right-padded input_ids / attention_mask / loss_mask (the loss mask
    marks the borrowed completion). `max_length` cuts borrowed completions on the right (at least
    one token stays). Raises for m < 2 (an example would be paired with itself).
    """
    m = input_ids.shape[0]
    partner = kto_shifted_pairs(m)
    real = attention_mask.bool()
    completion = loss_mask.bool() & real
    parts = []
    for i, j in enumerate(partner):
        prompt = input_ids[i][real[i] & ~completion[i]]
        borrowed = input_ids[j][completion[j]]
        if max_length is not None:
            borrowed = borrowed[: max(1, max_length - prompt.numel())]
        parts.append((prompt, borrowed))
    width = max(p.numel() + c.numel() for p, c in parts)
    ids = torch.full((m, width), pad_token_id, dtype=input_ids.dtype)
    attn = torch.zeros((m, width), dtype=attention_mask.dtype)
    lmask = torch.zeros((m, width), dtype=loss_mask.dtype)
    for i, (p, c) in enumerate(parts):
        n_p, n = p.numel(), p.numel() + c.numel()
        ids[i, :n_p], ids[i, n_p:n] = p, c
        attn[i, :n] = 1
        lmask[i, n_p:n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lmask}


def preference_losses(
    algorithm: str,
    algo_cfg: Any,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [B] of the pair loss registered as `algorithm` and per-pair statistics
    (detached [B] tensors): the loss's own, plus rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected.

    Inputs are SUMMED completion log-probs and completion token counts (see fleetrl.algos.preference).
    """
    entry = PREFERENCE_LOSSES.entry(algorithm)
    if entry.meta.get("needs_reference") and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"{algorithm} needs the reference log-probs of chosen and rejected")
    cfg = algorithm_config(algorithm, algo_cfg)
    losses, stats = entry.fn(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                             ref_chosen_logps, ref_rejected_logps, **cfg.model_dump())
    rc, rr = stats["rewards/chosen"], stats["rewards/rejected"]
    stats = {
        **stats,
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return losses, stats


def offline_ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    desirable: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Offline PPO with binary rewards: per-example losses [B] and per-example statistics.

    Token log-probs [B, T] of the policy (`logp`) and of the old policy (`old_logp`, here the
    reference); `desirable` [B] bool becomes the reward +1 / -1, the advantage of every completion
    token of the example (`mask`). The loss is the clipped surrogate averaged over those tokens.
    Statistics: rewards = the summed log ratio log(policy / old) (an implicit reward with beta 1),
    clip_frac = the share of tokens whose clipped term is the active one (no gradient).
    """
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True = desirable), got dtype {desirable.dtype}")
    adv = torch.where(desirable, 1.0, -1.0).to(logp.dtype)
    losses = offline_binary_ppo_loss(logp, old_logp, adv, mask, clip=clip)
    with torch.no_grad():
        valid = mask.bool()
        log_ratio = torch.where(valid, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        ratio = log_ratio.exp()
        clipped = torch.where(desirable.unsqueeze(-1), ratio > 1.0 + clip, ratio < 1.0 - clip) & valid
        n = valid.float().sum(-1).clamp(min=1)
        stats = {"rewards": log_ratio.sum(-1).float(), "clip_frac": clipped.float().sum(-1) / n}
    return losses, stats


def reward_model_losses(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry losses [B] of a reward model and its per-pair statistics."""
    losses = pairwise_reward_loss(chosen_scores, rejected_scores, margin)
    c, r = chosen_scores.detach(), rejected_scores.detach()
    return losses, {"scores/chosen": c, "scores/rejected": r, "scores/margins": c - r,
                    "scores/accuracies": (c > r).float()}


def pad_to_width(rows: dict[str, torch.Tensor], width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad [B, T] row tensors to `width` columns (input_ids with the pad id, masks with 0)."""
    out = {}
    for k, v in rows.items():
        extra = width - v.shape[1]
        if extra < 0:
            raise ValueError(f"pad_to_width: {k} has {v.shape[1]} columns, more than {width}")
        fill = pad_token_id if k == "input_ids" else 0
        out[k] = torch.cat([v, v.new_full((v.shape[0], extra), fill)], dim=1) if extra else v
    return out


# ---------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------


class OfflineObjective(Objective):
    """What the offline objectives share: the algorithm's validated config section, one unit per example."""

    evaluation: ClassVar[str] = "pairs"

    def __init__(self, models, learner_cfg: LearnerConfig | dict | None = None, options: Any = None, *,
                 name: str, **kw: Any):
        super().__init__(models, learner_cfg, options, name=name, **kw)
        self.algo_cfg = algorithm_config(name, options)

    @classmethod
    def needs_reference(cls, name: str, learner_cfg: LearnerConfig) -> bool:
        return OFFLINE_TABLE[name].reference

    @classmethod
    def reference_inputs(cls, name: str) -> str | None:
        """Which precomputed reference values a batch may carry (see the module doc)."""
        return None

    def info(self) -> dict[str, Any]:
        return {**super().info(), "algorithm": self.name}

    def units(self, micro: dict[str, torch.Tensor]) -> float:
        return float(micro[self.train_keys[0]].shape[0])

    def both_sides(self, micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, as one batch (one forward for both)."""
        sides = [{k: micro[f"{s}_{k}"] for k in _ROW_KEYS} for s in _SIDES]
        width = max(side["input_ids"].shape[1] for side in sides)
        c, r = (pad_to_width(side, width, self.pad_token_id) for side in sides)
        return {k: torch.cat([c[k], r[k]]) for k in _ROW_KEYS}


@OBJECTIVES.register("sft", role="offline")
class SFTObjective(OfflineObjective):
    """Token-mean negative log-likelihood of the completion tokens (of every token without
    sft.completion_only_loss)."""

    evaluation = "nll"

    def units(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        return (micro["loss_mask"].float() * micro["attention_mask"].float()).sum()

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        logps, ntok = sequence_logps(self.models.policy, micro, self.device, self.cfg.logprob_chunk_tokens)
        total = ntok.sum()
        stats.mean("loss", -logps.detach().sum().cpu(), total.cpu())
        stats.sum("num_tokens", micro["attention_mask"].sum())
        return -logps.sum() / total.clamp(min=1)


@OBJECTIVES.register("rm", role="offline")
class RewardModelObjective(OfflineObjective):
    """Bradley-Terry loss of a reward model's scores of chosen vs rejected (with an optional margin)."""

    model_kind = "score"
    evaluation = "scores"
    train_keys = PAIR_KEYS

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        rows = self.both_sides(micro)
        b = micro["chosen_input_ids"].shape[0]
        scores = sequence_scores(self.models.policy, rows, self.device)
        margin = micro["margin"].to(self.device).float() if "margin" in micro else None
        losses, st = reward_model_losses(scores[:b], scores[b:], margin)
        stats.examples({"loss": losses.detach(), **st})
        stats.sum("num_tokens", rows["attention_mask"].sum())
        return losses.mean()


class PairObjective(OfflineObjective):
    """Any pair loss of PREFERENCE_LOSSES (dpo, ipo, orpo, simpo, ...) on the policy's summed
    completion log-probs of chosen and rejected, with the reference's when the loss needs them."""

    train_keys = PAIR_KEYS

    @classmethod
    def needs_reference(cls, name: str, learner_cfg: LearnerConfig) -> bool:
        return bool(PREFERENCE_LOSSES.meta(name).get("needs_reference", False))

    @classmethod
    def reference_inputs(cls, name: str) -> str | None:
        return "pair" if cls.needs_reference(name, LearnerConfig()) else None

    def units(self, micro: dict[str, torch.Tensor]) -> float:
        if "weight" in micro:  # online DPO pads its pairs to a fixed count with weight-0 rows
            return float((micro["weight"] > 0).sum())
        return super().units(micro)

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        rows = self.both_sides(micro)
        b = micro["chosen_input_ids"].shape[0]
        logps, ntok = sequence_logps(self.models.policy, rows, self.device, self.cfg.logprob_chunk_tokens)
        ref_c = ref_r = None
        if self.needs_reference(self.name, self.cfg):
            if "ref_chosen_logps" in micro:
                ref_c = micro["ref_chosen_logps"].to(self.device).float()
                ref_r = micro["ref_rejected_logps"].to(self.device).float()
            else:
                with torch.no_grad():
                    ref, _ = sequence_logps(self.models.reference(), rows, self.device, self.cfg.logprob_chunk_tokens)
                ref_c, ref_r = ref[:b], ref[b:]
        losses, st = preference_losses(self.name, self.algo_cfg, logps[:b], logps[b:], ntok[:b], ntok[b:],
                                       ref_c, ref_r)
        if "weight" in micro:  # rows of weight 0 are padding: no loss, no statistics
            w = micro["weight"].to(self.device).to(losses.dtype)
            keep = (micro["weight"] > 0).cpu()
            stats.examples({"loss": losses.detach(), **st}, select=keep)
            stats.sum("num_tokens", rows["attention_mask"].sum())
            return (losses * w).sum() / keep.sum().clamp(min=1).to(losses.device)
        stats.examples({"loss": losses.detach(), **st})
        stats.sum("num_tokens", rows["attention_mask"].sum())
        return losses.mean()


class UnpairedObjective(OfflineObjective):
    """Desirable / undesirable single completions (KTO, offline PPO): implicit rewards per class."""

    train_keys = (*_ROW_KEYS, "desirable")

    def _record(self, stats: Stats, losses: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor,
                desirable: torch.Tensor) -> None:
        d = desirable.cpu()
        stats.examples({"rewards/chosen": rewards, "logps/chosen": logps.detach()}, select=d)
        stats.examples({"rewards/rejected": rewards, "logps/rejected": logps.detach()}, select=~d)

    def _weighted(self, losses: torch.Tensor, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        if "weight" in micro:  # per-example weights of scored feedback
            return losses * micro["weight"].to(self.device).to(losses.dtype)
        return losses

    def finish(self, out: dict[str, float]) -> dict[str, float]:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


@OBJECTIVES.register("kto", role="offline")
class KTOObjective(UnpairedObjective):
    """KTO with its reference point z0 from mismatched (prompt, other completion) pairs of the micro-batch."""

    @classmethod
    def check_config(cls, name: str, learner_cfg: LearnerConfig) -> None:
        if learner_cfg.micro_batch_size < 2:
            raise ValueError(
                f"kto needs learner.micro_batch_size >= 2 (got {learner_cfg.micro_batch_size}): its KL "
                "reference point pairs each prompt with another example's completion inside the micro-batch"
            )

    @classmethod
    def reference_inputs(cls, name: str) -> str | None:
        return "kto"

    def kl_rows(self, micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch's mismatched KL rows (see kto_mismatched_rows)."""
        return kto_mismatched_rows(micro["input_ids"], micro["attention_mask"], micro["loss_mask"],
                                   self.pad_token_id, self.max_length)

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return (self.models.all_reduce(t.detach().float().cpu()) / self.models.world_size).to(t.device)

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        cfg, dev, policy = self.algo_cfg, self.device, self.models.policy
        kl_rows = self.kl_rows(micro)
        logps, _ = sequence_logps(policy, micro, dev, self.cfg.logprob_chunk_tokens)
        with torch.no_grad():
            kl_logps, _ = sequence_logps(policy, kl_rows, dev, self.cfg.logprob_chunk_tokens)
            if "ref_logps" in micro:
                ref = micro["ref_logps"].to(dev).float()
                ref_kl = micro["ref_kl_logps"].to(dev).float()
            else:
                ref, _ = sequence_logps(self.models.reference(), micro, dev, self.cfg.logprob_chunk_tokens)
                ref_kl, _ = sequence_logps(self.models.reference(), kl_rows, dev, self.cfg.logprob_chunk_tokens)
        # z0 from this micro-batch's mismatched pairs, averaged over ranks (same micro-step everywhere).
        z0 = kto_reference_point(kl_logps, ref_kl, all_reduce_mean=self._all_reduce_mean)
        desirable = micro["desirable"].to(dev).bool()
        wd = cfg.desirable_weight if cfg.desirable_weight is not None else 1.0
        wu = cfg.undesirable_weight if cfg.undesirable_weight is not None else 1.0
        losses, rewards = kto_loss(logps, ref, desirable, z0, beta=cfg.beta,
                                   desirable_weight=wd, undesirable_weight=wu)
        losses = self._weighted(losses, micro)
        stats.examples({"loss": losses.detach()})
        stats.mean("kl", float(z0), 1.0)
        self._record(stats, losses, rewards, logps, desirable)
        stats.sum("num_tokens", micro["attention_mask"].sum() + kl_rows["attention_mask"].sum())
        return losses.mean()


@OBJECTIVES.register("offline_ppo", role="offline")
class OfflinePPOObjective(UnpairedObjective):
    """PPO's clipped objective, reward +1 / -1 on every completion token; the reference is the old policy."""

    @classmethod
    def reference_inputs(cls, name: str) -> str | None:
        return "tokens"

    def loss(self, micro: dict[str, torch.Tensor], stats: Stats, **_: Any) -> torch.Tensor:
        dev = self.device
        ids, attn = micro["input_ids"], micro["attention_mask"]
        logp, _ = token_logps(self.models.policy, ids, attn, dev, 1.0, chunk_tokens=self.cfg.logprob_chunk_tokens)
        mask = (micro["loss_mask"].float() * attn.float()).to(dev)
        if "old_logprobs" in micro:
            old = micro["old_logprobs"].to(dev).to(logp.dtype)
        else:
            with torch.no_grad():
                old, _ = token_logps(self.models.reference(), ids, attn, dev, 1.0,
                                     chunk_tokens=self.cfg.logprob_chunk_tokens)
        desirable = micro["desirable"].to(dev).bool()
        losses, st = offline_ppo_losses(logp, old.detach(), desirable, mask, clip=self.algo_cfg.clip)
        losses = self._weighted(losses, micro)
        stats.examples({"loss": losses.detach(), "clip_frac": st["clip_frac"]})
        self._record(stats, losses, st["rewards"], masked_sum(logp.detach(), mask, dim=-1), desirable)
        stats.sum("num_tokens", attn.sum())
        return losses.mean()


def OfflineLearner(cfg: LearnerConfig | dict, model_path: str | os.PathLike, *args: Any,  # noqa: N802
                   algorithm: str, algo_cfg: Any = None, **kwargs: Any) -> Learner:
    """One offline rank in this process: `Learner(..., objective=algorithm, objective_cfg=algo_cfg)`.

    `mini_batch_size`: examples (pairs for rm and pair losses) per optimizer step over all ranks. The
    reference model is loaded exactly when the algorithm needs one; `learner.reference` is not consulted.
    """
    return Learner(cfg, model_path, *args, objective=algorithm, objective_cfg=algo_cfg, **kwargs)


# ---------------------------------------------------------------------------------------------
# all ranks, on Ray
# ---------------------------------------------------------------------------------------------


def _pad_rows(batch: dict[str, torch.Tensor], multiple: int) -> tuple[dict[str, torch.Tensor], int]:
    """Repeat the last row until the row count is a multiple of `multiple`; returns (batch, n)."""
    n = next(iter(batch.values())).shape[0]
    pad = (-n) % multiple
    if pad:
        batch = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in batch.items()}
    return batch, n


class OfflineLearnerGroup(LearnerGroup):
    """The ranks of one offline trainer: data split across them, statistics all-reduced by them."""

    def __init__(
        self,
        cfg: LearnerConfig | dict,
        model_path: str | os.PathLike,
        algorithm: str,
        algo_cfg: Any = None,
        batch_size: int | None = None,
        total_steps: int | None = None,
        pad_token_id: int = 0,
        max_length: int | None = None,
        name_prefix: str = "",
        ready_timeout_s: float = 900.0,
    ):
        self.algorithm = algorithm
        objective_class(algorithm)  # unknown names fail here, in the driver
        algo_cfg = algorithm_config(algorithm, algo_cfg)
        super().__init__(
            cfg, model_path, total_steps=total_steps, mini_batch_size=batch_size, name_prefix=name_prefix,
            ready_timeout_s=ready_timeout_s,
            learner_kwargs={"objective": algorithm, "objective_cfg": algo_cfg.model_dump(),
                            "pad_token_id": pad_token_id, "max_length": max_length},
        )

    def _sharded(self, method: str, batch: dict[str, torch.Tensor], *args) -> list:
        shards = _split_rows(batch, self.num_ranks)
        return self._gather([getattr(a, method).remote(s, *args) for a, s in zip(self.actors, shards)])

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on a global batch of exactly `batch_size` examples; rank i trains on
        rows [i*B/R, (i+1)*B/R). Returns the step's statistics (all-reduced)."""
        n = next(iter(batch.values())).shape[0]
        if n != self.mini_batch_size:
            raise ValueError(f"train_step: the batch has {n} examples, the trainer was built for "
                             f"batch_size={self.mini_batch_size}")
        return self._sharded("train_step", batch)[0]

    def sequence_logps(self, batch: dict[str, torch.Tensor],
                       which: str = "policy") -> dict[str, torch.Tensor]:
        padded, n = _pad_rows(batch, self.num_ranks)  # equal shards: ZeRO-3 ranks gather together
        parts = self._sharded("sequence_logps", padded, which)
        return {k: torch.cat([p[k] for p in parts])[:n] for k in ("logps", "tokens")}

    def sequence_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        padded, n = _pad_rows(batch, self.num_ranks)
        return torch.cat(self._sharded("sequence_scores", padded))[:n]

    def kl_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO: reference log-probs of the KL rows of a training batch, sharded exactly as train_step does."""
        n = next(iter(batch.values())).shape[0]
        if n != self.mini_batch_size:
            raise ValueError(f"kl_reference_logps takes a training batch of {self.mini_batch_size} rows, "
                             f"got {n}")
        return torch.cat(self._sharded("kl_reference_logps", batch))

    def release_reference(self) -> None:
        self._gather(self._call_all("release_reference"))

