"""`PolicyLearner`: one DeepSpeed rank holding the trained policy and its frozen reference.

A plain class: `learner/group.py` runs one per Ray actor, tests build one in-process
(world_size=1). Every rank of a learner must call every public method in the same order
(ZeRO collectives run inside them); inputs and outputs are CPU tensors and plain Python.

Sequence layout (shared with the rollout side): a row is prompt + completion, padded on either
side, `attention_mask` marks real tokens, and per-token tensors (`loss_mask`, `old_logprobs`,
`advantages`, `ref_logprobs`, the returned log-probs) are aligned with `input_ids`:
value[:, t] belongs to token t, predicted from tokens < t. Position ids count real tokens
only, as vLLM numbers them, so left padding changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fleetrl.algos.losses import aggregate, entropy_from_logits, kl_estimate, policy_loss, token_logprobs
from fleetrl.core.weight_wire import WeightPlan, broadcast, init_side_group, pack_bucket, plan_buckets
from fleetrl.learner.config import (
    LearnerConfig,
    micro_steps_per_mini_batch,
    resolve_backend,
    resolve_dtype,
)
from fleetrl.learner.deepspeed_utils import (
    client_optimizer,
    lr_lambda,
    reference_ds_config,
    set_dist_env,
    skip_cpu_shm_comm_op,
    train_ds_config,
)

TRAIN_KEYS = ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "advantages")
_CLIENT_KEY = "fleetrl_client_state"
# Stats averaged over valid completion tokens (the rest: see _optimizer_step).
_TOKEN_STATS = ("kl", "entropy", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean")


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 holds only a partition of it."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _agg_units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """What `aggregate(..., agg)` averages over: tokens, sequences with tokens, or all sequences."""
    if agg == "token-mean":
        return mask.float().sum()
    if agg == "seq-mean-token-mean":
        return (mask.float().sum(-1) > 0).float().sum()
    return torch.tensor(float(mask.shape[0]))


class PolicyLearner:
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
    ):
        """`total_steps`: optimizer steps of the run (needed by the cosine schedule).

        `mini_batch_size`: sequences per optimizer step over ALL ranks; it fixes DeepSpeed's
        gradient-accumulation steps. None = one micro-batch per rank per step.
        """
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        cfg = self.cfg
        self.model_path = str(model_path)
        self.rank, self.world_size = rank, world_size
        self.mini_batch_size = mini_batch_size or cfg.micro_batch_size * world_size
        self.grad_accum = micro_steps_per_mini_batch(self.mini_batch_size, world_size, cfg.micro_batch_size)
        self.mini_per_rank = self.mini_batch_size // world_size

        accel = get_accelerator()
        self.on_gpu = accel.device_name() != "cpu"
        if local_rank is None:
            # Under Ray each rank sees only its own GPU; with all GPUs visible, ranks share them out.
            n = accel.device_count() if self.on_gpu else 0
            local_rank = rank % n if n > 1 else 0
        self.local_rank = local_rank
        self.backend = resolve_backend(cfg, self.on_gpu)
        self.dtype_name = resolve_dtype(cfg, self.on_gpu)
        self.dtype = getattr(torch, self.dtype_name)
        if self.on_gpu:
            accel.set_device(local_rank)
            self.device = torch.device(accel.device_name(local_rank))
        else:
            self.device = torch.device("cpu")
            skip_cpu_shm_comm_op()

        set_dist_env(rank, world_size, local_rank, master_addr, master_port)
        deepspeed.init_distributed(dist_backend=self.backend, verbose=False)
        torch.manual_seed(cfg.seed)

        self.zero3 = cfg.zero_stage == 3
        self.ds_config = train_ds_config(cfg, world_size, self.grad_accum, self.dtype_name, self.on_gpu)
        self._hf_ds_config = None
        if self.zero3 and importlib.util.find_spec("accelerate") is not None:
            # Kept alive on purpose: while it exists, from_pretrained builds the model inside
            # zero.Init, so no rank ever holds the whole model. (transformers needs accelerate.)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

        model = self._load_model(self.model_path)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if len(_shape(p)) < 2 or name.endswith(".bias") else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        client_opt = None
        if "optimizer" not in self.ds_config:
            client_opt = client_optimizer(cfg, groups)  # AdamW or RMSprop (learner.optimizer)
        schedule = lr_lambda(cfg, total_steps)
        sched_fn = None
        if "scheduler" not in self.ds_config:
            def sched_fn(opt):  # DeepSpeed calls it with the optimizer it wraps
                return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=client_opt,
            model_parameters=groups if client_opt is None else None,
            config=self.ds_config,
            lr_scheduler=sched_fn,
        )
        # ZeRO-0 in fp32 clips without recording the norm; we measure it ourselves then.
        self._own_grad_norm = cfg.zero_stage == 0 and self.dtype_name == "float32"

        self.ref_engine = None
        self.ref_module = None
        if cfg.reference:
            ref = self._load_model(self.model_path)
            ref.config.use_cache = False
            ref.requires_grad_(False)
            ref.eval()
            if self.zero3:
                # An optimizer-less engine partitions the reference's params like the policy's.
                self.ref_engine, _, _, _ = deepspeed.initialize(
                    model=ref, config=reference_ds_config(cfg, world_size, self.dtype_name)
                )
                self.ref_engine.eval()
                self.ref_module = self.ref_engine.module
            else:
                self.ref_module = ref.to(self.device)

        self._side_group = None
        self._side_device = torch.device("cpu")

    # ------------------------------------------------------------------ helpers

    def _load_model(self, path: str) -> torch.nn.Module:
        """The trained model (and its reference copy) from `path`: a causal LM. Subclasses may
        load another head; called by __init__ after dtype/device are known."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)

    def release_reference(self) -> None:
        """Drop the frozen reference (e.g. once its log-probs are precomputed) to free its memory."""
        import gc

        self.ref_engine = None
        self.ref_module = None
        gc.collect()

    def info(self) -> dict[str, Any]:
        """Where and how this rank runs (for logs; also the group's readiness probe)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "dtype": self.dtype_name,
            "backend": self.backend,
            "zero_stage": self.cfg.zero_stage,
            "grad_accum_steps": self.grad_accum,
            "pid": os.getpid(),
        }

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return int(self.engine.global_steps)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        # named_parameters drops tied duplicates (lm_head tied to the embedding is sent once).
        return dict(self.engine.module.named_parameters())

    def _gathered(self, params: list[torch.nn.Parameter]):
        import deepspeed

        if self.zero3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size == 1:
            return t
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu()

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def _model_inputs(
        self, ids: torch.Tensor, attn: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[int, int, dict[str, Any], torch.Tensor] | None:
        """(lo, hi, model kwargs, attention mask) of a micro-batch with the columns that are padding in
        every row cut ([lo, hi) kept, on the device); None when every column is padding.

        Position ids count real tokens (as vLLM numbers them). Given `position_ids` (packed rows:
        positions restart at 0 for each packed sequence) are passed with no 2-D attention mask, so
        transformers builds a block-diagonal causal mask from them.
        """
        cols = attn.bool().any(0).nonzero().flatten()
        if cols.numel() == 0:
            return None
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        ids_t = ids[:, lo:hi].to(self.device)
        attn_t = attn[:, lo:hi].to(self.device).long()
        if position_ids is None:
            kwargs = {"input_ids": ids_t, "attention_mask": attn_t,
                      "position_ids": (attn_t.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
        else:
            kwargs = {"input_ids": ids_t, "attention_mask": None,
                      "position_ids": position_ids[:, lo:hi].to(self.device).long(), "use_cache": False}
        return lo, hi, kwargs, attn_t

    def _forward(
        self,
        fn: Callable[..., Any],
        ids: torch.Tensor,
        attn: torch.Tensor,
        temperature: float,
        entropy: str = "no",
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Aligned log-probs [b, T] (and entropy if asked: "no" | "detached" | "grad") of one micro-batch.

        Columns that are padding in every row are cut before the forward and restored as 0 after.
        A token's value is 0 unless it and the token before it are real (it has context).
        See `_model_inputs` for `position_ids`.
        """
        b, T = ids.shape
        inputs = self._model_inputs(ids, attn, position_ids)
        if inputs is None:
            return torch.zeros(b, T, device=self.device), (torch.zeros(b, T, device=self.device)
                                                          if entropy != "no" else None)
        lo, hi, kwargs, attn_t = inputs
        ids_t = kwargs["input_ids"]
        logits = fn(**kwargs).logits
        has_ctx = attn_t.bool() & F.pad(attn_t.bool(), (1, 0))[:, :-1]
        zero = torch.zeros((), device=logits.device)
        logp = torch.where(has_ctx, token_logprobs(logits, ids_t, temperature), zero)
        ent = None
        if entropy != "no":
            scaled = logits if temperature == 1.0 else logits / temperature
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                ent = torch.where(has_ctx, entropy_from_logits(scaled), zero)
            ent = F.pad(ent, (lo, T - hi))
        return F.pad(logp, (lo, T - hi)), ent

    @staticmethod
    def _check_batch(batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"learner batch is missing {missing}; it has {sorted(batch)}")
        shape = tuple(batch["input_ids"].shape)
        for k in keys + ("ref_logprobs",):
            if k in batch and k != "advantages" and tuple(batch[k].shape) != shape:
                raise ValueError(f"learner batch[{k!r}] has shape {tuple(batch[k].shape)}, input_ids has {shape}")

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_logprobs(
        self, batch: dict[str, torch.Tensor], which: str = "policy", temperature: float = 1.0
    ) -> torch.Tensor:
        """Log-probs [B, T] (fp32, CPU) of `batch["input_ids"]` under the policy or the reference.

        With ZeRO-3 every rank must pass the same number of rows (params are gathered per layer).
        """
        self._check_batch(batch, ("input_ids", "attention_mask"))
        if which == "policy":
            fn = self.engine
            self.engine.eval()
        elif which == "reference":
            if self.ref_module is None:
                raise ValueError("compute_logprobs(which='reference') but learner.reference is false in the config")
            fn = self.ref_engine if self.ref_engine is not None else self.ref_module
        else:
            raise ValueError(f"which must be 'policy' or 'reference', got {which!r}")
        ids, attn = batch["input_ids"], batch["attention_mask"]
        mb = self.cfg.micro_batch_size
        out = [self._forward(fn, ids[i : i + mb], attn[i : i + mb], temperature)[0].float().cpu()
               for i in range(0, ids.shape[0], mb)]
        self.engine.train()
        return torch.cat(out) if out else torch.zeros(ids.shape, dtype=torch.float32)

    # ------------------------------------------------------------------ training

    def train(
        self,
        batch: dict[str, torch.Tensor],
        mini_batch_size: int,
        epochs: int = 1,
        temperature: float = 1.0,
    ) -> list[dict[str, float]]:
        """PPO-style updates on this rank's shard: one optimizer step per mini-batch per epoch.

        `mini_batch_size` is global (all ranks); it must equal the one the learner was built with.
        Returns one stats dict per optimizer step, identical on every rank.
        """
        self._check_train_batch(batch, mini_batch_size, TRAIN_KEYS)
        lc = self.cfg.loss
        if lc.kl_in == "loss" and lc.kl_coef > 0 and "ref_logprobs" not in batch:
            raise KeyError(
                f"learner.loss.kl_coef={lc.kl_coef} with kl_in='loss' needs batch['ref_logprobs']: "
                "compute them with compute_logprobs(batch, 'reference'), or set kl_coef: 0"
            )
        return self._mini_batch_steps(batch, epochs, lambda mini: self._optimizer_step(mini, temperature))

    def _check_train_batch(self, batch: dict[str, torch.Tensor], mini_batch_size: int,
                           keys: tuple[str, ...]) -> None:
        if mini_batch_size != self.mini_batch_size:
            raise ValueError(
                f"train(mini_batch_size={mini_batch_size}) but this learner was built for "
                f"mini_batch_size={self.mini_batch_size} (it fixes DeepSpeed's gradient accumulation): "
                "build the learner with the mini-batch size you train with"
            )
        self._check_batch(batch, keys)
        n = batch["input_ids"].shape[0]
        if n == 0 or n % self.mini_per_rank:
            raise ValueError(
                f"this rank got {n} sequences, not a positive multiple of the per-rank mini-batch "
                f"{self.mini_per_rank} (= mini_batch_size {self.mini_batch_size} / {self.world_size} ranks): "
                "make the train batch a multiple of mini_batch_size"
            )

    def _mini_batch_steps(self, batch: dict[str, torch.Tensor], epochs: int,
                          step: Callable[[dict[str, torch.Tensor]], dict[str, float]]) -> list[dict[str, float]]:
        """`step` (one optimizer step) on each per-rank mini-batch of `batch`, `epochs` times over."""
        n = batch["input_ids"].shape[0]
        self.engine.train()
        stats = []
        for _ in range(epochs):
            for start in range(0, n, self.mini_per_rank):
                stats.append(step({k: v[start : start + self.mini_per_rank] for k, v in batch.items()}))
        return stats

    def _optimizer_step(self, mini: dict[str, torch.Tensor], temperature: float) -> dict[str, float]:
        lc = self.cfg.loss
        mask = mini["loss_mask"].float() * mini["attention_mask"].float()
        # Every micro-batch's loss is weighted by its share of the GLOBAL mini-batch's units
        # (tokens or sequences, per agg), so accumulation + DeepSpeed's mean over ranks and
        # micro-steps yields exactly the aggregate over the whole mini-batch.
        totals = self._all_reduce(torch.stack([_agg_units(mask, lc.agg), mask.sum()]))
        units_total, tokens_total = float(totals[0]), float(totals[1])
        scale = self.world_size * self.grad_accum
        has_ref = "ref_logprobs" in mini
        entropy_mode = "grad" if lc.entropy_coef != 0 else "detached"
        lr = float(self.engine.get_lr()[0])
        sums = torch.zeros(2 + len(_TOKEN_STATS), dtype=torch.float64)  # loss, policy_loss, token stats
        ratio_max = torch.zeros(1, dtype=torch.float64)
        own_norm = None
        mb = self.cfg.micro_batch_size
        for i in range(0, self.mini_per_rank, mb):
            m = mask[i : i + mb].to(self.device)
            logp, ent = self._forward(self.engine, mini["input_ids"][i : i + mb],
                                      mini["attention_mask"][i : i + mb], temperature, entropy_mode)
            pl, st = policy_loss(
                logp, mini["old_logprobs"][i : i + mb].to(self.device).float(),
                mini["advantages"][i : i + mb].to(self.device).float(), m,
                clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip, agg=lc.agg,
            )
            loss = pl
            kl = torch.zeros((), device=self.device)
            if has_ref:
                kl = aggregate(kl_estimate(logp, mini["ref_logprobs"][i : i + mb].to(self.device).float(),
                                           lc.kl_estimator), m, lc.agg)
                if lc.kl_in == "loss" and lc.kl_coef > 0:
                    loss = loss + lc.kl_coef * kl
            ent_agg = aggregate(ent, m, lc.agg)
            if lc.entropy_coef != 0:
                loss = loss - lc.entropy_coef * ent_agg
            units = _agg_units(m, lc.agg)
            weight = float(units) / units_total * scale if units_total > 0 else 0.0
            norm = self._backward_step(loss * weight, last=i + mb >= self.mini_per_rank)
            own_norm = norm if norm is not None else own_norm

            tok = m.sum().double().cpu()
            u = units.double().cpu()
            sums[0] += loss.detach().double().cpu() * u
            sums[1] += pl.detach().double().cpu() * u
            token_vals = {"kl": kl, "entropy": ent_agg, **st}
            for j, key in enumerate(_TOKEN_STATS):
                sums[2 + j] += token_vals[key].detach().double().cpu() * tok
            ratio_max = torch.maximum(ratio_max, st["ratio_max"].detach().double().cpu().reshape(1))

        sums = self._all_reduce(sums)
        ratio_max = self._all_reduce(ratio_max, op="max")
        grad_norm = self._grad_norm(own_norm)
        u_div, t_div = max(units_total, 1e-12), max(tokens_total, 1e-12)
        out = {
            "loss": float(sums[0]) / u_div,
            "policy_loss": float(sums[1]) / u_div,
            **{key: float(sums[2 + j]) / t_div for j, key in enumerate(_TOKEN_STATS)},
            "ratio_max": float(ratio_max[0]),
            "grad_norm": grad_norm,
            "lr": lr,
            "num_tokens": tokens_total,
        }
        return out

    def _backward_step(self, loss: torch.Tensor, last: bool) -> float | None:
        """Backward of one micro-batch's (already weighted) loss, then DeepSpeed's step, which only
        updates at the last micro-batch of the mini-batch. Returns our own grad norm there when
        DeepSpeed does not record one (ZeRO-0 in fp32), else None."""
        self.engine.backward(loss)
        own = None
        if self._own_grad_norm and last:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            own = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()  # a no-op until the last micro-batch of the mini-batch
        return own

    def _grad_norm(self, own_norm: float | None) -> float:
        """Gradient norm of the last optimizer step (before clipping)."""
        norm = own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ weight sync

    def weight_plan(self, version: int, dtype: str | None = None) -> WeightPlan:
        """Bucket layout of the policy's weights, in the model's own (layer by layer) order.

        `dtype` (e.g. "bfloat16") casts on send; default: the training dtype.
        """
        cast = getattr(torch, dtype) if dtype else None
        specs = [(name, _shape(p), cast or p.dtype) for name, p in self._params().items()]
        return plan_buckets(specs, version, bucket_bytes=self.cfg.weight_sync_bucket_mb * 2**20)

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the side group as its rank 0 (blocks until every receiver joins)."""
        if self.rank != 0:
            return
        self._side_group = init_side_group(host, port, 0, world_size, backend)
        self._side_device = self.device if backend == "nccl" else torch.device("cpu")

    def send_weights(self, plan: WeightPlan) -> dict[str, float]:
        """Broadcast the weights bucket by bucket from rank 0. EVERY rank must call it (ZeRO-3 gathers)."""
        if self.rank == 0 and self._side_group is None:
            raise RuntimeError("send_weights before init_weight_sync: join the side group first")
        t0 = time.perf_counter()
        params = self._params()
        for bucket in plan.buckets:
            missing = [s.name for s in bucket.specs if s.name not in params]
            if missing:
                raise KeyError(f"weight plan names {missing} that the policy does not have: "
                               "make the plan with this learner's weight_plan()")
            chosen = [params[s.name] for s in bucket.specs]
            with self._gathered(chosen):
                if self.rank == 0:
                    flat = pack_bucket(bucket, {s.name: params[s.name].data for s in bucket.specs},
                                       device=self._side_device)
                    broadcast(self._side_group, flat)
        return {"num_bytes": float(plan.num_bytes), "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameters as CPU tensors on rank 0 ({} on other ranks). Every rank must call it."""
        out = {}
        for name, p in self._params().items():
            with self._gathered([p]):
                if self.rank == 0:
                    out[name] = p.data.detach().to("cpu", copy=True)
        return out

    # ------------------------------------------------------------------ saving

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """A transformers/vLLM-loadable copy (safetensors + config + tokenizer), written by rank 0."""
        from transformers import AutoTokenizer

        state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero3 else None
        if self.rank == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.engine.module.save_pretrained(out, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out)
        self._barrier()

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, client_state: dict | None = None,
                        tag: str | None = None) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) for resuming; every rank calls it."""
        # Under one key: DeepSpeed hands back its own bookkeeping mixed into the client state.
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={_CLIENT_KEY: dict(client_state or {})})

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict:
        """Restore a save_checkpoint; returns its client_state."""
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint in {ckpt_dir} (no 'latest' file or tag {tag!r}): "
                "point resume at a directory written by save_checkpoint"
            )
        return dict((client_state or {}).get(_CLIENT_KEY, {}))
