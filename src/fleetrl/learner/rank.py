"""`Learner`: one DeepSpeed rank = an engine + the accumulation routine + an objective.

The same class is every learner rank: the policy of online RL (objective "policy"), PPO's critic
("critic") and every offline trainer ("sft", "rm", "dpo", "ipo", "kto", "orpo", "simpo",
"offline_ppo", ...). The objective picks the model kind and whether a frozen reference is loaded;
`Engine` (learner/engine.py) builds and steps the model; `optimizer_step` (learner/accumulate.py)
is the one micro-batch loop. A plain class: `learner/group.py` runs one per Ray actor, tests build
one in-process (world_size=1). Every rank must call every public method in the same order (ZeRO
collectives run inside them); inputs and outputs are CPU tensors and plain Python.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

import torch

from fleetrl.algos.registry import PREFERENCE_LOSSES
from fleetrl.core.weight_wire import WeightPlan
from fleetrl.learner.accumulate import optimizer_step
from fleetrl.learner.config import LearnerConfig
from fleetrl.learner.engine import Engine
from fleetrl.learner.forward import micro_batches, sequence_logps, sequence_scores, token_logps, token_values
from fleetrl.learner.objective import OBJECTIVES, Objective
from fleetrl.learner.policy import check_shapes


def objective_class(name: str) -> type[Objective]:
    """The objective registered as `name`; a pair loss of PREFERENCE_LOSSES is the pair objective."""
    # The objective modules register themselves on import (imported here: they import this module).
    from fleetrl.learner import critic, offline, policy  # noqa: F401

    if name in OBJECTIVES:
        return OBJECTIVES.get(name)
    if name in PREFERENCE_LOSSES:
        return offline.PairObjective
    known = sorted(set(OBJECTIVES.names()) | set(PREFERENCE_LOSSES.names()))
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown learner objective {name!r}{hint}; known: {', '.join(known)}")


class Learner:
    def __init__(
        self,
        cfg: LearnerConfig | dict,
        model_path: str | os.PathLike,
        *engine_args: Any,
        objective: str = "policy",
        objective_cfg: Any = None,
        pad_token_id: int = 0,
        max_length: int | None = None,
        **engine_kwargs: Any,
    ):
        """`engine_args` / `engine_kwargs`: the rest of `Engine`'s arguments (rank, world_size,
        master_addr, master_port, total_steps, mini_batch_size, local_rank), in that order.
        `objective`: a name of OBJECTIVES (or of a pair loss); `objective_cfg`: its options (the
        algorithm's config section for offline objectives, value_clip and agg for the critic; the
        policy reads learner.loss). `pad_token_id` pads rows built here and tells a reward model's head
        where rows end; `max_length` bounds rows built here."""
        cls = objective_class(objective)
        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        cls.check_config(objective, self.cfg)
        self.engine = Engine(self.cfg, model_path, *engine_args, model_kind=cls.model_kind,
                             reference=cls.needs_reference(objective, self.cfg), pad_token_id=pad_token_id,
                             **engine_kwargs)
        self.objective = cls(self.engine, self.cfg, objective_cfg, name=objective, pad_token_id=pad_token_id,
                             max_length=max_length)
        self.rank, self.world_size = self.engine.rank, self.engine.world_size

    def info(self) -> dict[str, Any]:
        """Where and how this rank runs, and what it trains (for logs; also the group's readiness probe)."""
        return {**self.engine.info(), **self.objective.info()}

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return self.engine.global_step

    # ------------------------------------------------------------------ scoring (no gradients)

    def _needs_model(self, kind: str, method: str) -> None:
        if self.engine.model_kind != kind:
            raise ValueError(f"{method} needs a {kind} model, but this rank's objective "
                             f"{self.objective.name!r} trains a {self.engine.model_kind} model")

    @torch.no_grad()
    def _per_micro(self, batch: dict[str, torch.Tensor], f: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                   empty: torch.Tensor) -> torch.Tensor:
        """f on each micro-batch of `batch` (CPU results concatenated); then the policy is in train mode."""
        out = [f(m).float().cpu() for m in micro_batches(batch, self.cfg.micro_batch_size)]
        self.engine.train_mode()
        return torch.cat(out) if out else empty

    def compute_logprobs(
        self, batch: dict[str, torch.Tensor], which: str = "policy", temperature: float = 1.0
    ) -> torch.Tensor:
        """Log-probs [B, T] (fp32, CPU) of `batch["input_ids"]` under the policy or the reference.

        With ZeRO-3 every rank must pass the same number of rows (params are gathered per layer).
        """
        check_shapes(batch, ("input_ids", "attention_mask"))
        self._needs_model("causal_lm", "compute_logprobs")
        fn = self.engine.scoring(which)
        dev = self.engine.device
        return self._per_micro(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            lambda m: token_logps(fn, m["input_ids"], m["attention_mask"], dev, temperature,
                                  pack=self.cfg.pack_samples, chunk_tokens=self.cfg.logprob_chunk_tokens)[0],
            torch.zeros(batch["input_ids"].shape, dtype=torch.float32))

    def compute_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values [B, T] (fp32, CPU) of `batch` under the current critic (0 where a token has no context)."""
        check_shapes(batch, ("input_ids", "attention_mask"))
        self._needs_model("value", "compute_values")
        fn = self.engine.scoring("policy")
        dev = self.engine.device
        return self._per_micro(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            lambda m: token_values(fn, m["input_ids"], m["attention_mask"], dev),
            torch.zeros(batch["input_ids"].shape, dtype=torch.float32))

    def sequence_logps(self, batch: dict[str, torch.Tensor],
                       which: str = "policy") -> dict[str, torch.Tensor]:
        """{"logps": summed completion log-probs [B], "tokens": completion token counts [B]} of rows
        (input_ids, attention_mask, loss_mask), under the policy or the reference."""
        self._needs_model("causal_lm", "sequence_logps")
        fn = self.engine.scoring(which)
        dev = self.engine.device
        chunk = self.cfg.logprob_chunk_tokens
        both = self._per_micro(batch, lambda m: torch.stack(sequence_logps(fn, m, dev, chunk), -1),
                               torch.zeros(0, 2))
        return {"logps": both[:, 0].contiguous(), "tokens": both[:, 1].contiguous()}

    def sequence_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A reward model's scores [B] of rows (input_ids, attention_mask)."""
        if self.engine.model_kind != "score":
            raise ValueError(f"sequence_scores is for reward models; this learner trains "
                             f"{self.objective.name}")
        fn = self.engine.scoring("policy")
        return self._per_micro(batch, lambda m: sequence_scores(fn, m, self.engine.device), torch.zeros(0))

    def kl_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO: the reference's summed log-probs [B] of the mismatched KL rows that `train_step` builds
        from this exact shard (same micro-batches), for offline.reference_logps: precompute."""
        rows_of = getattr(self.objective, "kl_rows", None)
        if rows_of is None:
            raise ValueError(f"kl_reference_logps is for kto; this learner trains {self.objective.name}")
        fn = self.engine.scoring("reference")
        return self._per_micro(batch, lambda m: sequence_logps(fn, rows_of(m), self.engine.device,
                                                                           self.cfg.logprob_chunk_tokens)[0],
                               torch.zeros(0))

    def release_reference(self) -> None:
        """Drop the frozen reference (e.g. once its log-probs are precomputed) to free its memory."""
        self.engine.release_reference()

    # ------------------------------------------------------------------ training

    def train(
        self,
        batch: dict[str, torch.Tensor],
        mini_batch_size: int,
        epochs: int = 1,
        temperature: float = 1.0,
    ) -> list[dict[str, float]]:
        """Updates on this rank's shard: one optimizer step per mini-batch per epoch (PPO-style).

        `mini_batch_size` is global (all ranks); it must equal the one the learner was built with.
        `temperature` is the sampler's (log-probs of the policy objective). Returns one stats dict
        per optimizer step, identical on every rank.
        """
        eng = self.engine
        if mini_batch_size != eng.mini_batch_size:
            raise ValueError(
                f"train(mini_batch_size={mini_batch_size}) but this learner was built for "
                f"mini_batch_size={eng.mini_batch_size} (it fixes DeepSpeed's gradient accumulation): "
                "build the learner with the mini-batch size you train with"
            )
        n = self.objective.check(batch)
        per = eng.mini_per_rank
        if n == 0 or n % per:
            raise ValueError(
                f"this rank got {n} sequences, not a positive multiple of the per-rank mini-batch "
                f"{per} (= mini_batch_size {eng.mini_batch_size} / {eng.world_size} ranks): "
                "make the train batch a multiple of mini_batch_size"
            )
        if "behaviour_logprobs" in batch and (epochs > 1 or n > per):
            raise ValueError(
                f"the batch asks for the off-policy correction in the train forward (behaviour_logprobs), "
                f"which needs one optimizer step per batch, but it gets {epochs} epoch(s) x {n // per} "
                "mini-batch(es): compute the proximal log-probs in a separate pass (online/off_policy.py)"
            )
        stats = []
        for _ in range(epochs):
            for start in range(0, n, per):
                mini = {k: v[start : start + per] for k, v in batch.items()}
                micros = micro_batches(mini, self.cfg.micro_batch_size)
                stats.append(optimizer_step(eng, micros, self.objective, temperature=temperature))
        return stats

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's shard (mini_batch_size / world_size examples).

        Returns the step's statistics averaged over the whole global batch (identical on every
        rank): loss, grad_norm, lr, num_tokens (real tokens through the forward, all ranks) and
        the objective's own (rewards/..., logps/..., kl, orpo/..., scores/...).
        """
        eng = self.engine
        n = self.objective.check(batch)
        if n != eng.mini_per_rank:
            raise ValueError(
                f"train_step got {n} examples on this rank; it takes exactly the per-rank batch "
                f"{eng.mini_per_rank} (= batch size {eng.mini_batch_size} / {eng.world_size} ranks)"
            )
        return optimizer_step(eng, micro_batches(batch, self.cfg.micro_batch_size), self.objective)

    # ------------------------------------------------------------------ weights and saving (the engine's)

    def weight_plan(self, version: int, dtype: str | None = None, bucket_mb: int | None = None) -> WeightPlan:
        return self.engine.weight_plan(version, dtype, bucket_mb)

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> None:
        self.engine.init_weight_sync(host, port, world_size, backend)

    def send_weights(self, plan: WeightPlan, checksums: bool = False) -> dict[str, Any]:
        return self.engine.send_weights(plan, checksums)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.gathered_state_dict()

    def memory(self) -> dict[str, int]:
        return self.engine.memory()

    @property
    def num_ranks(self) -> int:
        """The ranks whose files make up a checkpoint (the offline loop verifies each one's manifest)."""
        return self.engine.world_size

    def save_hf(self, out_dir: str | os.PathLike, storage_options: dict | None = None) -> None:
        self.engine.save_hf(out_dir, storage_options)

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, client_state: dict | None = None,
                        tag: str | None = None, storage_options: dict | None = None) -> None:
        # The rank's torch RNG goes with it (exact resume). DeepSpeed keeps rank 0's client state,
        # so every rank resumes with rank 0's generator.
        self.engine.save_checkpoint(ckpt_dir, {**(client_state or {}), _RNG_KEY: torch.get_rng_state()}, tag,
                                    storage_options)

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, tag: str | None = None,
                        storage_options: dict | None = None) -> dict:
        state = self.engine.load_checkpoint(ckpt_dir, tag, storage_options)
        if _RNG_KEY in state:
            torch.set_rng_state(state.pop(_RNG_KEY))
        return state


_RNG_KEY = "learner_torch_rng"


def PolicyLearner(cfg: LearnerConfig | dict, model_path: str | os.PathLike, *args: Any,  # noqa: N802
                  **kwargs: Any) -> Learner:
    """One policy rank in this process: `Learner(..., objective="policy")`."""
    return Learner(cfg, model_path, *args, objective="policy", **kwargs)
