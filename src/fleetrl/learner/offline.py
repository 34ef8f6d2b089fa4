"""Offline trainers on the DeepSpeed learner: SFT, reward model, DPO/cDPO, IPO, KTO, ORPO, offline PPO.

`OfflineLearner` is a `PolicyLearner` (same engine, ZeRO stages, reference model, checkpoints,
save_hf) with one optimizer step per call of `train_step`; `OfflineLearnerGroup` runs one per
rank on Ray. The losses are the pure functions of learner/losses.py; this file only builds their
inputs from batches and reduces their outputs exactly over micro-batches and ranks.

Batch layouts (CPU tensors, rows right-padded, prompt tokens then completion tokens):
- sft:  input_ids, attention_mask, loss_mask [B, T] (+ position_ids for packed rows)
- kto:  input_ids, attention_mask, loss_mask [B, T], desirable [B] bool
        (+ ref_logps, ref_kl_logps [B] when precomputed; + weight [B], each example's loss weight)
- offline_ppo: as kto (+ old_logprobs [B, T], the reference's token log-probs, when precomputed)
- rm, dpo, ipo, orpo: chosen_input_ids, chosen_attention_mask, chosen_loss_mask, and the same
        three for rejected, all [B, T] with one T (+ ref_chosen_logps, ref_rejected_logps [B]
        when precomputed; + margin [B] for rm)
`loss_mask` marks the completion tokens whose log-probs make a sequence's log-prob.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from fleetrl.algos.losses import masked_sum
from fleetrl.algos.preference import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    kto_shifted_pairs,
    offline_binary_ppo_loss,
    orpo_loss,
    pairwise_reward_loss,
)
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.group import LearnerGroup, _split_rows
from fleetrl.learner.offline_config import (
    OFFLINE_ALGORITHMS,
    REFERENCE_ALGORITHMS,
    UNPAIRED_ALGORITHMS,
    DPOConfig,
    IPOConfig,
    KTOConfig,
    OfflinePPOConfig,
    ORPOConfig,
    RMConfig,
    SFTConfig,
)
from fleetrl.learner.policy import PolicyLearner

PAIR_ALGORITHMS = ("rm", "dpo", "ipo", "orpo")
_SIDES = ("chosen", "rejected")
_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")
_ALGO_CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ipo": IPOConfig, "kto": KTOConfig,
                 "orpo": ORPOConfig, "offline_ppo": OfflinePPOConfig}


def algorithm_config(algorithm: str, algo_cfg: Any) -> Any:
    """The validated config of `algorithm` (from a dict, the model itself, or None for defaults)."""
    if algorithm not in OFFLINE_ALGORITHMS:
        raise ValueError(f"unknown offline algorithm {algorithm!r}; allowed: {', '.join(OFFLINE_ALGORITHMS)}")
    cls = _ALGO_CONFIGS[algorithm]
    if isinstance(algo_cfg, cls):
        return algo_cfg
    return cls.model_validate(algo_cfg or {})


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
    """Per-pair losses [B] of dpo / ipo / orpo and per-pair statistics (detached [B] tensors).

    Inputs are SUMMED completion log-probs and completion token counts; IPO and ORPO use the
    length-averaged log-probs. The implicit rewards are beta * (policy - reference) (on sums for
    DPO, averages for IPO) and beta * average log-prob for ORPO, which has no reference.
    """
    cfg = algorithm_config(algorithm, algo_cfg)
    nc, nr = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    stats: dict[str, torch.Tensor] = {}
    if algorithm in ("dpo", "ipo"):
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{algorithm} needs the reference log-probs of chosen and rejected")
        if algorithm == "dpo":
            losses, rc, rr = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                      beta=cfg.beta, label_smoothing=cfg.label_smoothing)
        else:
            losses, rc, rr = ipo_loss(chosen_logps / nc, rejected_logps / nr, ref_chosen_logps / nc,
                                      ref_rejected_logps / nr, beta=cfg.beta)
    elif algorithm == "orpo":
        avg_c, avg_r = chosen_logps / nc, rejected_logps / nr
        losses, log_odds = orpo_loss(avg_c, avg_r, -avg_c, beta=cfg.beta)
        rc, rr = (cfg.beta * avg_c).detach(), (cfg.beta * avg_r).detach()
        nll = (-avg_c).detach().float()
        stats.update({"orpo/nll": nll, "orpo/or_loss": losses.detach() - nll, "orpo/log_odds_ratio": log_odds})
    else:
        raise ValueError(f"preference_losses: {algorithm!r} is not a pairwise log-prob algorithm (dpo, ipo, orpo)")
    stats.update({
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "rewards/accuracies": (rc > rr).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    })
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
# one rank
# ---------------------------------------------------------------------------------------------


class _Sums:
    """Named sums and counts of per-example statistics, all-reduced in one tensor."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, key: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        cur = self.values.setdefault(key, [0.0, 0.0])
        cur[0] += float(total)
        cur[1] += float(count)

    def add_examples(self, stats: dict[str, torch.Tensor], select: torch.Tensor | None = None) -> None:
        for key, v in stats.items():
            v = v.detach().double().cpu()
            if select is None:
                self.add(key, v.sum(), v.numel())
            else:
                self.add(key, v[select].sum(), select.sum())

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        keys = sorted(self.values)  # every rank has the same keys: the tensor lines up
        flat = torch.tensor([self.values[k] for k in keys], dtype=torch.float64).reshape(-1, 2)
        flat = all_reduce(flat)
        return {k: float(flat[i, 0] / flat[i, 1]) if flat[i, 1] > 0 else float("nan")
                for i, k in enumerate(keys)}


class OfflineLearner(PolicyLearner):
    """One DeepSpeed rank of an offline trainer. Every rank calls every method in the same order."""

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
        algorithm: str,
        algo_cfg: Any = None,
        pad_token_id: int = 0,
        max_length: int | None = None,
    ):
        """`mini_batch_size`: examples (pairs for rm/dpo/ipo/orpo) per optimizer step over all ranks.

        The reference model is loaded exactly when the algorithm needs one (dpo, ipo, kto, offline_ppo);
        `learner.reference` is not consulted. `pad_token_id` pads rows built here (KTO's KL rows)
        and tells a reward model's head where sequences end. `max_length` bounds KTO's KL rows.
        """
        self.algorithm = algorithm
        self.algo_cfg = algorithm_config(algorithm, algo_cfg)
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        cfg = cfg.model_copy(update={"reference": algorithm in REFERENCE_ALGORITHMS})
        if algorithm == "kto" and cfg.micro_batch_size < 2:
            raise ValueError(
                f"kto needs learner.micro_batch_size >= 2 (got {cfg.micro_batch_size}): its KL reference "
                "point pairs each prompt with another example's completion inside the micro-batch"
            )
        super().__init__(cfg, model_path, rank, world_size, master_addr, master_port, total_steps,
                         mini_batch_size, local_rank)

    def _load_model(self, path: str) -> torch.nn.Module:
        if self.algorithm != "rm":
            return super()._load_model(path)
        from transformers import AutoModelForSequenceClassification

        # From a causal LM checkpoint (e.g. an SFT run) this adds a fresh one-output score head.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=self.dtype)
        # The head reads each row at its last token that is not the pad id: rows are padded with it.
        model.config.pad_token_id = self.pad_token_id
        return model

    def info(self) -> dict[str, Any]:
        return {**super().info(), "algorithm": self.algorithm}

    # ------------------------------------------------------------------ helpers

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        device = t.device
        return (self._all_reduce(t.detach().float().cpu()) / self.world_size).to(device)

    def _ref_fn(self):
        if self.ref_module is None:
            raise ValueError(
                f"{self.algorithm}: the reference model was released (offline.reference_logps: precompute) "
                "but this batch carries no precomputed reference log-probs"
            )
        return self.ref_engine if self.ref_engine is not None else self.ref_module

    def _seq_logps(self, fn, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs [b] and completion token counts [b] of rows (on self.device)."""
        logp, _ = self._forward(fn, rows["input_ids"], rows["attention_mask"], 1.0,
                                position_ids=rows.get("position_ids"))
        mask = (rows["loss_mask"].float() * rows["attention_mask"].float()).to(self.device)
        return masked_sum(logp, mask, dim=-1), mask.sum(-1)

    def _scores(self, fn, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """A reward model's scalar score per row [b] (rows right-padded with the pad id)."""
        ids, attn = rows["input_ids"], rows["attention_mask"]
        cols = attn.bool().any(0).nonzero().flatten()
        hi = int(cols[-1]) + 1 if cols.numel() else 1
        ids_t, attn_t = ids[:, :hi].to(self.device), attn[:, :hi].to(self.device).long()
        positions = (attn_t.cumsum(-1) - 1).clamp(min=0)
        out = fn(input_ids=ids_t, attention_mask=attn_t, position_ids=positions, use_cache=False)
        return out.logits[:, 0].float()

    def _both_sides(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, as one batch (one forward for both)."""
        sides = [{k: mb[f"{s}_{k}"] for k in _ROW_KEYS} for s in _SIDES]
        width = max(side["input_ids"].shape[1] for side in sides)
        c, r = (pad_to_width(side, width, self.pad_token_id) for side in sides)
        return {k: torch.cat([c[k], r[k]]) for k in _ROW_KEYS}

    def _batch_rows(self, batch: dict[str, torch.Tensor]) -> int:
        key = "chosen_input_ids" if self.algorithm in PAIR_ALGORITHMS else "input_ids"
        needed = ([f"{s}_{k}" for s in _SIDES for k in _ROW_KEYS] if self.algorithm in PAIR_ALGORITHMS
                  else list(_ROW_KEYS) + (["desirable"] if self.algorithm in UNPAIRED_ALGORITHMS else []))
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"{self.algorithm} batch is missing {missing}; it has {sorted(batch)}")
        n = batch[key].shape[0]
        for k, v in batch.items():
            if v.shape[0] != n:
                raise ValueError(f"{self.algorithm} batch[{k!r}] has {v.shape[0]} rows, {key} has {n}")
        return n

    def _micro_batches(self, batch: dict[str, torch.Tensor], size: int):
        n = next(iter(batch.values())).shape[0]
        for i in range(0, n, size):
            yield {k: v[i : i + size] for k, v in batch.items()}

    # ------------------------------------------------------------------ training

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's shard (mini_batch_size / world_size examples).

        Returns the step's statistics averaged over the whole global batch (identical on every
        rank): loss, grad_norm, lr, num_tokens (real tokens through the forward, all ranks) and
        the algorithm's own (rewards/..., logps/..., kl, orpo/..., scores/...).
        """
        n = self._batch_rows(batch)
        if n != self.mini_per_rank:
            raise ValueError(
                f"train_step got {n} examples on this rank; it takes exactly the per-rank batch "
                f"{self.mini_per_rank} (= batch size {self.mini_batch_size} / {self.world_size} ranks)"
            )
        self.engine.train()
        mb = self.cfg.micro_batch_size
        scale = self.world_size * self.grad_accum
        units = self._units(batch)
        units_total = float(self._all_reduce(units.sum().double().reshape(1))[0])
        lr = float(self.engine.get_lr()[0])
        sums = _Sums()
        tokens = 0.0
        own_norm = None
        for k, micro in enumerate(self._micro_batches(batch, mb)):
            loss, micro_tokens = self._micro_loss(micro, sums)
            u = float(units[k * mb : (k + 1) * mb].sum())
            # Weighted by the micro-batch's share of the global batch's units (examples, or tokens
            # for sft): accumulation + DeepSpeed's mean over ranks and micro-steps is then exact.
            weight = u / units_total * scale if units_total > 0 else 0.0
            norm = self._backward_step(loss * weight, last=(k + 1) * mb >= self.mini_per_rank)
            own_norm = norm if norm is not None else own_norm
            tokens += micro_tokens
        out = sums.reduce(self._all_reduce)
        if "rewards/chosen" in out and "rewards/margins" not in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out.update({
            "grad_norm": self._grad_norm(own_norm),
            "lr": lr,
            "num_tokens": float(self._all_reduce(torch.tensor([tokens], dtype=torch.float64))[0]),
        })
        return out

    def _units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the loss averages over, per row: completion tokens (sft) or 1 (one example)."""
        if self.algorithm == "sft":
            return (batch["loss_mask"].float() * batch["attention_mask"].float()).sum(-1)
        return torch.ones(self._batch_rows(batch))

    def _micro_loss(self, mb: dict[str, torch.Tensor], sums: _Sums) -> tuple[torch.Tensor, float]:
        """The micro-batch's mean loss (over its units) and the real tokens it ran; adds its stats."""
        algo = self.algorithm
        if algo == "sft":
            logps, ntok = self._seq_logps(self.engine, mb)
            total = ntok.sum()
            loss = -logps.sum() / total.clamp(min=1)
            sums.add("loss", -logps.detach().sum().cpu(), total.cpu())
            return loss, float(mb["attention_mask"].sum())
        if algo == "kto":
            return self._kto_micro_loss(mb, sums)
        if algo == "offline_ppo":
            return self._ppo_micro_loss(mb, sums)
        rows = self._both_sides(mb)
        b = mb["chosen_input_ids"].shape[0]
        if algo == "rm":
            scores = self._scores(self.engine, rows)
            margin = mb["margin"].to(self.device).float() if "margin" in mb else None
            losses, stats = reward_model_losses(scores[:b], scores[b:], margin)
        else:
            logps, ntok = self._seq_logps(self.engine, rows)
            ref_c = ref_r = None
            if algo in REFERENCE_ALGORITHMS:
                if "ref_chosen_logps" in mb:
                    ref_c = mb["ref_chosen_logps"].to(self.device).float()
                    ref_r = mb["ref_rejected_logps"].to(self.device).float()
                else:
                    with torch.no_grad():
                        ref, _ = self._seq_logps(self._ref_fn(), rows)
                    ref_c, ref_r = ref[:b], ref[b:]
            losses, stats = preference_losses(algo, self.algo_cfg, logps[:b], logps[b:], ntok[:b], ntok[b:],
                                              ref_c, ref_r)
        sums.add_examples({"loss": losses.detach(), **stats})
        return losses.mean(), float(rows["attention_mask"].sum())

    def _kto_micro_loss(self, mb: dict[str, torch.Tensor], sums: _Sums) -> tuple[torch.Tensor, float]:
        cfg = self.algo_cfg
        kl_rows = kto_mismatched_rows(mb["input_ids"], mb["attention_mask"], mb["loss_mask"],
                                      self.pad_token_id, self.max_length)
        logps, _ = self._seq_logps(self.engine, mb)
        with torch.no_grad():
            kl_logps, _ = self._seq_logps(self.engine, kl_rows)
            if "ref_logps" in mb:
                ref = mb["ref_logps"].to(self.device).float()
                ref_kl = mb["ref_kl_logps"].to(self.device).float()
            else:
                ref, _ = self._seq_logps(self._ref_fn(), mb)
                ref_kl, _ = self._seq_logps(self._ref_fn(), kl_rows)
        # z0 from this micro-batch's mismatched pairs, averaged over ranks (same micro-step everywhere).
        z0 = kto_reference_point(kl_logps, ref_kl, all_reduce_mean=self._all_reduce_mean)
        desirable = mb["desirable"].to(self.device).bool()
        wd = cfg.desirable_weight if cfg.desirable_weight is not None else 1.0
        wu = cfg.undesirable_weight if cfg.undesirable_weight is not None else 1.0
        losses, rewards = kto_loss(logps, ref, desirable, z0, beta=cfg.beta,
                                   desirable_weight=wd, undesirable_weight=wu)
        if "weight" in mb:  # per-example weights of scored feedback
            losses = losses * mb["weight"].to(self.device).to(losses.dtype)
        sums.add_examples({"loss": losses.detach()})
        sums.add("kl", float(z0), 1.0)
        d = desirable.cpu()
        sums.add_examples({"rewards/chosen": rewards, "logps/chosen": logps.detach()}, select=d)
        sums.add_examples({"rewards/rejected": rewards, "logps/rejected": logps.detach()}, select=~d)
        tokens = float(mb["attention_mask"].sum() + kl_rows["attention_mask"].sum())
        return losses.mean(), tokens

    def _ppo_micro_loss(self, mb: dict[str, torch.Tensor], sums: _Sums) -> tuple[torch.Tensor, float]:
        ids, attn = mb["input_ids"], mb["attention_mask"]
        logp, _ = self._forward(self.engine, ids, attn, 1.0)
        mask = (mb["loss_mask"].float() * attn.float()).to(self.device)
        if "old_logprobs" in mb:
            old = mb["old_logprobs"].to(self.device).to(logp.dtype)
        else:
            with torch.no_grad():
                old, _ = self._forward(self._ref_fn(), ids, attn, 1.0)
        desirable = mb["desirable"].to(self.device).bool()
        losses, stats = offline_ppo_losses(logp, old.detach(), desirable, mask, clip=self.algo_cfg.clip)
        if "weight" in mb:
            losses = losses * mb["weight"].to(self.device).to(losses.dtype)
        logps = masked_sum(logp.detach(), mask, dim=-1)
        sums.add_examples({"loss": losses.detach(), "clip_frac": stats["clip_frac"]})
        d = desirable.cpu()
        sums.add_examples({"rewards/chosen": stats["rewards"], "logps/chosen": logps}, select=d)
        sums.add_examples({"rewards/rejected": stats["rewards"], "logps/rejected": logps}, select=~d)
        return losses.mean(), float(attn.sum())

    # ------------------------------------------------------------------ scoring (no gradients)

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor], which: str = "policy") -> dict[str, torch.Tensor]:
        """{"logps": summed completion log-probs [B], "tokens": completion token counts [B]} of rows
        (input_ids, attention_mask, loss_mask), under the policy or the reference."""
        fn = self._which(which)
        out_lp, out_n = [], []
        for micro in self._micro_batches(batch, self.cfg.micro_batch_size):
            lp, n = self._seq_logps(fn, micro)
            out_lp.append(lp.float().cpu())
            out_n.append(n.float().cpu())
        self.engine.train()
        return {"logps": torch.cat(out_lp), "tokens": torch.cat(out_n)}

    @torch.no_grad()
    def sequence_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A reward model's scores [B] of rows (input_ids, attention_mask)."""
        if self.algorithm != "rm":
            raise ValueError(f"sequence_scores is for reward models; this learner trains {self.algorithm}")
        fn = self._which("policy")
        out = [self._scores(fn, micro).cpu() for micro in self._micro_batches(batch, self.cfg.micro_batch_size)]
        self.engine.train()
        return torch.cat(out)

    @torch.no_grad()
    def kl_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO: the reference's summed log-probs [B] of the mismatched KL rows that `train_step`
        builds from this exact shard (same micro-batches), for offline.reference_logps: precompute."""
        fn = self._which("reference")
        out = []
        for micro in self._micro_batches(batch, self.cfg.micro_batch_size):
            kl_rows = kto_mismatched_rows(micro["input_ids"], micro["attention_mask"], micro["loss_mask"],
                                          self.pad_token_id, self.max_length)
            out.append(self._seq_logps(fn, kl_rows)[0].float().cpu())
        return torch.cat(out)

    def _which(self, which: str):
        if which == "policy":
            self.engine.eval()
            return self.engine
        if which == "reference":
            return self._ref_fn()
        raise ValueError(f"which must be 'policy' or 'reference', got {which!r}")


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
        algo_cfg = algorithm_config(algorithm, algo_cfg)
        super().__init__(
            cfg, model_path, total_steps=total_steps, mini_batch_size=batch_size, name_prefix=name_prefix,
            ready_timeout_s=ready_timeout_s, learner_cls=OfflineLearner,
            learner_kwargs={"algorithm": algorithm, "algo_cfg": algo_cfg.model_dump(),
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

    def sequence_logps(self, batch: dict[str, torch.Tensor], which: str = "policy") -> dict[str, torch.Tensor]:
        padded, n = _pad_rows(batch, self.num_ranks)  # equal shards: ZeRO-3 ranks gather together
        parts = self._sharded("sequence_logps", padded, which)
        return {k: torch.cat([p[k] for p in parts])[:n] for k in ("logps", "tokens")}

    def sequence_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        padded, n = _pad_rows(batch, self.num_ranks)
        return torch.cat(self._sharded("sequence_scores", padded))[:n]

    def kl_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO: reference log-probs of the KL rows of a training batch, sharded exactly as train_step shards it."""
        n = next(iter(batch.values())).shape[0]
        if n != self.mini_batch_size:
            raise ValueError(f"kl_reference_logps takes a training batch of {self.mini_batch_size} rows, got {n}")
        return torch.cat(self._sharded("kl_reference_logps", batch))

    def release_reference(self) -> None:
        self._gather(self._call_all("release_reference"))

