"""`Engine`: one DeepSpeed rank's model, optimizer and schedule, and everything done to them.

Built once per rank: the model (a causal LM, a value model or a reward model, see `MODEL_LOADERS`),
the DeepSpeed engine with its optimizer and LR schedule, and optionally the frozen reference. It
runs backward and optimizer steps, reduces tensors over ranks, saves (Hugging Face export and
DeepSpeed checkpoints) and sends weights to the rollout fleet. It knows nothing of losses: the
objectives (learner/objective.py) do, and learner/accumulate.py drives the two together.

Every rank must call every public method in the same order (ZeRO collectives run inside them);
inputs and outputs are CPU tensors and plain Python. `Engine` is also the objectives'
`ModelAccess` (policy, reference(), device, world_size, all_reduce).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from fleetrl.core.nodes import this_node
from fleetrl.core.weight_check import tensor_checksum
from fleetrl.core.weight_wire import (
    BucketSender,
    WeightPlan,
    init_side_group,
    memory_runs,
    plan_buckets,
    unpack_bucket,
)
from fleetrl.learner.config import (
    LearnerConfig,
    micro_steps_per_mini_batch,
    resolve_backend,
    resolve_dtype,
)
from fleetrl.learner.deepspeed_utils import (
    client_optimizer,
    init_default_group,
    lr_lambda,
    reference_ds_config,
    set_dist_env,
    skip_cpu_shm_comm_op,
    train_ds_config,
)
from fleetrl.learner.lora import AdapterDisabled, adapter_tensors, apply_lora

_CLIENT_KEY = "fleetrl_client_state"
# At most this many runs of back-to-back parameters: a plan follows memory order (one flat buffer per
# ZeRO-1/2 parameter group); more (e.g. no ZeRO: a storage per parameter) and it keeps the model's order.
_MAX_RUNS = 8


def _shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """Full shape of a parameter, also when ZeRO-3 holds only a partition of it."""
    return tuple(getattr(p, "ds_shape", p.shape))


def load_causal_lm(path: str, dtype: torch.dtype | None = None, pad_token_id: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_value_model(path: str, dtype: torch.dtype | None = None, pad_token_id: int = 0) -> torch.nn.Module:
    """The critic's value model: the LM with a one-output linear head on every position
    (`*ForTokenClassification`, num_labels=1, no dropout, no bias). From a reward model (a one-output
    `*ForSequenceClassification`) it takes the score head over unchanged; from a causal LM the head
    is new (small random weights)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    # Regression targets: dropout would only add noise to the values; no bias, like a reward head,
    # so a reward model's `score.weight` is the whole head.
    config.classifier_dropout = 0.0
    config.token_classification_bias = False
    return AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype)


def load_score_model(path: str, dtype: torch.dtype | None = None, pad_token_id: int = 0) -> torch.nn.Module:
    """A reward model (one-output sequence classification); from a causal LM checkpoint (e.g. an SFT
    run) this adds a fresh score head. The head reads each row at its last token that is not
    `pad_token_id`: rows must be padded with it."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    return model


# Objective.model_kind -> loader(path, dtype, pad_token_id)
MODEL_LOADERS: dict[str, Callable[..., torch.nn.Module]] = {
    "causal_lm": load_causal_lm,
    "value": load_value_model,
    "score": load_score_model,
}


def active_dropout(model: torch.nn.Module) -> float:
    """The largest dropout probability the model applies in train mode: dropout modules (LoRA's
    included) and the config's dropout settings (attention dropout is a config value, not a module).
    A classifier head's dropout does not touch token log-probs and is left out."""
    ps = [float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        ps += [float(v) for k, v in config.to_dict().items()
               if ("dropout" in k or "pdrop" in k) and k != "classifier_dropout"
               and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(ps, default=0.0)


class Engine:
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
        model_kind: str = "causal_lm",
        reference: bool = False,
        reference_path: str | os.PathLike | None = None,
        pad_token_id: int = 0,
    ):
        """`total_steps`: optimizer steps of the run (needed by the cosine schedule).

        `mini_batch_size`: sequences (or examples) per optimizer step over ALL ranks; it fixes
        DeepSpeed's gradient-accumulation steps. None = one micro-batch per rank per step.
        `model_kind`: a key of MODEL_LOADERS. `reference`: also load a frozen copy of the model,
        or with `reference_path` (a local model directory with the policy's tokenizer) that model instead.
        """
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        cfg = self.cfg
        if model_kind not in MODEL_LOADERS:
            raise ValueError(f"unknown model kind {model_kind!r}; known: {', '.join(MODEL_LOADERS)}")
        self.model_kind, self.pad_token_id = model_kind, int(pad_token_id)
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
            # Ray's OMP_NUM_THREADS is the actor's num_cpus, read only at torch's first parallel
            # region; set the count explicitly so a rank uses exactly the cores it reserved.
            torch.set_num_threads(cfg.cpu_threads())
            # Ray starts workers at nice 15 (RAY_worker_niceness): on a busy node every process at
            # nice 0 then preempts the learner, the run's critical path. Undo it where allowed.
            # Linux keeps niceness per thread: reset every thread there is (OpenMP's included).
            for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
                with contextlib.suppress(OSError):
                    if os.getpriority(os.PRIO_PROCESS, int(tid)) > 0:
                        os.setpriority(os.PRIO_PROCESS, int(tid), 0)

        set_dist_env(rank, world_size, local_rank, master_addr, master_port)
        init_default_group(self.backend, rank, world_size, master_addr, master_port, self.device)
        deepspeed.init_distributed(dist_backend=self.backend, verbose=False)
        torch.manual_seed(cfg.seed)

        self.zero3 = cfg.zero_stage == 3
        self.ds_config = train_ds_config(cfg, world_size, self.grad_accum, self.dtype_name, self.on_gpu)
        self._hf_ds_config = None
        if importlib.util.find_spec("accelerate") is not None:  # transformers' DeepSpeed hooks need it
            from transformers.integrations import HfDeepSpeedConfig
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # transformers keeps one process-global DeepSpeed config: a ZeRO-3 engine built earlier in
            # this process must not make this engine's loads partitioned.
            unset_hf_deepspeed_config()
            if self.zero3:
                # Kept alive on purpose: while it exists, from_pretrained builds the model inside
                # zero.Init, so no rank ever holds the whole model.
                self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

        model = self._load(self.model_path)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = cfg.lora
        if self.lora is not None:
            # Base weights frozen: only the adapter lands in the optimizer groups below.
            model = apply_lora(model, self.lora, model_kind)

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
        if reference_path is not None and not reference:
            raise ValueError("reference_path is given but no reference is loaded (reference=False): the "
                             "objective compares with no reference model")
        self.reference_path = str(reference_path or self.model_path) if reference else None
        if reference and self.lora is not None and reference_path is None:
            # The reference is the policy with its adapter switched off: no second model.
            self.ref_module = AdapterDisabled(self.engine, self.engine.module)
        elif reference:
            ref = self._load(self.reference_path)
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
        self._sender: BucketSender | None = None  # rank 0: the side group's reused buffers, pipelined sends
        self._checksum_pool = None  # rank 0: one thread computing the sent buckets' checksums meanwhile

    # ------------------------------------------------------------------ models

    def _load(self, path: str) -> torch.nn.Module:
        return MODEL_LOADERS[self.model_kind](path, self.dtype, self.pad_token_id)

    @property
    def policy(self):
        """The trained model as a callable (the DeepSpeed engine)."""
        return self.engine

    def reference(self):
        """The frozen reference as a callable; raises when it was not loaded or was released."""
        if self.ref_module is None:
            raise ValueError(
                "no reference model on this rank: learner.reference is false in the config, or the reference "
                "was released (offline.reference_logps: precompute) but the batch carries no precomputed "
                "reference log-probs"
            )
        return self.ref_engine if self.ref_engine is not None else self.ref_module

    def scoring(self, which: str):
        """The policy (in eval mode; `train_mode` switches back) or the reference, for no-grad scoring."""
        if which == "policy":
            self.engine.eval()
            return self.engine
        if which == "reference":
            if self.ref_module is None:
                raise ValueError("compute_logprobs(which='reference') but this rank has no reference model "
                                 "(learner.reference is false in the config, or it was released)")
            return self.reference()
        raise ValueError(f"which must be 'policy' or 'reference', got {which!r}")

    def release_reference(self) -> None:
        """Drop the frozen reference (e.g. once its log-probs are precomputed) to free its memory."""
        import gc

        if isinstance(self.ref_module, AdapterDisabled):
            return  # the adapter-disabled reference costs no memory; keep it
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
            "reference": self.reference_path,
            "grad_accum_steps": self.grad_accum,
            "torch_threads": torch.get_num_threads(),
            "dropout": active_dropout(self.engine.module),  # 0: a train forward equals an eval one
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            **this_node(),
            "pid": os.getpid(),
        }

    def memory(self) -> dict[str, int]:
        """This rank's learner memory in bytes: parameters (policy + a separate reference, if any),
        the trainable part, and the optimizer's state tensors (after a first step)."""
        def nbytes(ps) -> int:
            return sum(p.numel() * p.element_size() for p in ps)

        params = nbytes(self.engine.module.parameters())
        if isinstance(self.ref_module, torch.nn.Module):
            params += nbytes(self.ref_module.parameters())
        opt = self.engine.optimizer
        opt = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return {"param_bytes": params,
                "trainable_bytes": nbytes(p for p in self.engine.module.parameters() if p.requires_grad),
                "optimizer_bytes": nbytes(state)}

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return int(self.engine.global_steps)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        # named_parameters drops tied duplicates (lm_head tied to the embedding is sent once).
        return dict(self.engine.module.named_parameters())

    def _sync_params(self) -> dict[str, torch.nn.Parameter]:
        """What a weight sync sends: the whole model, or with LoRA only the adapter's A/B tensors."""
        return adapter_tensors(self.engine.module) if self.lora is not None else self._params()

    def _gathered(self, params: list[torch.nn.Parameter]):
        import deepspeed

        if self.zero3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ collectives and steps

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` summed (or maxed) over the ranks, on the CPU."""
        import torch.distributed as dist

        if self.world_size == 1:
            return t
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def train_mode(self) -> None:
        self.engine.train()

    def backward_step(self, loss: torch.Tensor, last: bool) -> float | None:
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

    def grad_norm(self, own_norm: float | None) -> float:
        """Gradient norm of the last optimizer step (before clipping)."""
        norm = own_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ weight sync

    def weight_plan(self, version: int, dtype: str | None = None, bucket_mb: int | None = None) -> WeightPlan:
        """Bucket layout of the policy's weights, in the model's own (layer by layer) order, or in
        memory order under ZeRO-1/2 (below).

        `dtype` (e.g. "bfloat16") casts on send; default: the training dtype. `bucket_mb`: default
        learner.weight_sync_bucket_mb (benches try others).
        """
        cast = getattr(torch, dtype) if dtype else None
        params = self._sync_params()
        order, breaks = list(params), set()
        if cast is None and not self.zero3 and self.lora is None:
            # ZeRO-1/2 keep each parameter group in one flat buffer: buckets that follow it go on the
            # wire from there, unpacked (BucketSender.send, in_place). The small runs (the no-decay
            # group: norms, biases) go first, so that on arrival of its big weights a layer is whole
            # and vLLM's layerwise reload processes it while the rest is still on the wire.
            runs = memory_runs([(name, p.data) for name, p in params.items()])
            if len(runs) <= _MAX_RUNS:
                runs.sort(key=lambda run: sum(params[n].numel() for n in run))
                order = [n for run in runs for n in run]
                breaks = {run[0] for run in runs[1:]}
        specs = [(name, _shape(params[name]), cast or params[name].dtype) for name in order]
        return plan_buckets(specs, version, bucket_bytes=(bucket_mb or self.cfg.weight_sync_bucket_mb) * 2**20,
                            lora_scale=None if self.lora is None else self.lora.scale, breaks=breaks)

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the side group as its rank 0 (blocks until every receiver joins)."""
        if self.rank != 0:
            return
        self._side_group = init_side_group(host, port, 0, world_size, backend)
        # Two slots: bucket k+1 is packed while bucket k is on the wire (the same on gloo and NCCL).
        self._sender = BucketSender(self._side_group, self.device if backend == "nccl" else torch.device("cpu"))

    def send_weights(self, plan: WeightPlan, checksums: bool = False) -> dict[str, Any]:
        """Broadcast the weights bucket by bucket from rank 0. EVERY rank must call it (ZeRO-3 gathers).

        Rank 0 packs each bucket into a reused buffer and starts its broadcast without waiting, so the
        next bucket is gathered and packed while this one is on the wire (``BucketSender``).
        ``checksums``: rank 0 also returns each sent tensor's checksum and dtype (as sent), for the
        receivers' check after the reload (``fleetrl.core.weight_check``). They are computed from the
        packed bucket in a thread of their own while it is broadcast; ``checksum_s`` is their compute
        time, ``checksum_wait_s`` how long the send waited for them after its last broadcast."""
        if self.rank == 0 and self._sender is None:
            raise RuntimeError("send_weights before init_weight_sync: join the side group first")
        t0 = time.perf_counter()
        params = self._sync_params()
        sums: dict[str, tuple[float, float, float]] = {}
        dtypes: dict[str, str] = {}
        compute_s: list[float] = []
        check = checksums and self.rank == 0
        first_sent = 0.0  # when the first bucket's broadcast started
        unpacked = self._sender.unpacked if self.rank == 0 else 0
        if check and self._checksum_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._checksum_pool = ThreadPoolExecutor(1, thread_name_prefix="fleetrl-checksums")
        try:
            for bucket in plan.buckets:
                missing = [s.name for s in bucket.specs if s.name not in params]
                if missing:
                    raise KeyError(f"weight plan names {missing} that the policy does not have: "
                                   "make the plan with this learner's weight_plan()")
                chosen = [params[s.name] for s in bucket.specs]
                with self._gathered(chosen):
                    if self.rank == 0:
                        read = None if not check else (lambda flat, b=bucket: self._checksum_pool.submit(
                            _bucket_checksums, b, flat, sums, dtypes, compute_s))
                        self._sender.send(bucket, {s.name: params[s.name].data for s in bucket.specs}, read,
                                          in_place=not self.zero3)  # ZeRO-3's gathered copies are freed at once
                        first_sent = first_sent or time.perf_counter()
            waited = self._sender.finish() if self.rank == 0 else 0.0
        except BaseException:
            if self.rank == 0 and self._sender is not None:
                self._sender.abandon()
            raise
        t1 = time.perf_counter()
        # t_start/t_end: CLOCK_MONOTONIC, the same clock in every process of a node (the bench's timeline).
        out: dict[str, Any] = {"num_bytes": float(plan.num_bytes), "seconds": t1 - t0, "t_start": t0, "t_end": t1,
                               "t_first_sent": first_sent,
                               "buckets_in_place": (self._sender.unpacked - unpacked) if self.rank == 0 else 0}
        if checksums and self.rank == 0:
            out.update(checksums=sums, dtypes=dtypes, checksum_s=sum(compute_s),
                       checksum_wait_s=waited)
        return out

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

    def _num_params(self) -> int:
        return sum(int(torch.Size(_shape(p)).numel()) for p in self._params().values())

    def _check_space(self, where: str, storage, hf: bool) -> None:
        """Fail before writing when the disk cannot hold this rank's part (an estimate: weights in
        the training dtype; a checkpoint adds fp32 master weights and two Adam moments, split over
        ranks under ZeRO)."""
        from fleetrl.core.storage import check_free_space

        n = self._num_params()
        weights = n * self.dtype.itemsize if self.rank == 0 else 0
        optim = 0 if hf else n * 12 // (self.world_size if self.cfg.zero_stage >= 1 else 1)
        what = f"{'the final model' if hf else 'a checkpoint'} (learner rank {self.rank})"
        check_free_space(storage, where, weights + optim, what)

    def save_hf(self, out_dir: str | os.PathLike, storage_options: dict | None = None) -> None:
        """A transformers/vLLM-loadable copy (safetensors + config + tokenizer), written by rank 0
        into `out_dir` (a local path or URI: the staging location of storage.begin) with its manifest."""
        from transformers import AutoTokenizer

        from fleetrl.core.storage import Storage, commit_rank_files, scratch_dir

        state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero3 else None
        if self.rank == 0:
            storage = Storage(storage_options)
            scratch = scratch_dir(storage, str(out_dir), 0)
            self._check_space(scratch, storage, hf=True)
            # With LoRA the module is a PeftModel: this writes the adapter in PEFT's format, and
            # adapter_config.json names the base model (`fleetrl export --merged` merges the two).
            self.engine.module.save_pretrained(scratch, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(scratch)
            commit_rank_files(storage, scratch, str(out_dir), 0)
        self.barrier()

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, client_state: dict | None = None,
                        tag: str | None = None, storage_options: dict | None = None) -> None:
        """DeepSpeed checkpoint (weights, optimizer, LR schedule) for resuming; every rank calls it.

        Each rank writes to a local scratch dir, then moves/uploads its files into `ckpt_dir` (a
        local path or URI: the staging location of storage.begin) and writes its manifest last; the
        driver verifies every rank's manifest before it publishes the checkpoint."""
        from fleetrl.core.storage import Storage, commit_rank_files, scratch_dir

        storage = Storage(storage_options)
        scratch = scratch_dir(storage, str(ckpt_dir), self.rank)
        self._check_space(scratch, storage, hf=False)
        # Under one key: DeepSpeed hands back its own bookkeeping mixed into the client state.
        # With LoRA the frozen base is not saved: resume reloads it from the model path.
        self.engine.save_checkpoint(scratch, tag=tag, client_state={_CLIENT_KEY: dict(client_state or {})},
                                    exclude_frozen_parameters=self.lora is not None)
        self.barrier()  # DeepSpeed's own writes are done on every rank before files move
        commit_rank_files(storage, scratch, str(ckpt_dir), self.rank)

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, tag: str | None = None,
                        storage_options: dict | None = None) -> dict:
        """Restore a save_checkpoint (local path or URI); returns its client_state. Files are read
        with torch.load(weights_only=True): tensors and plain data only, plus SAFE_CHECKPOINT_GLOBALS."""
        import shutil
        import tempfile

        from fleetrl.core.storage import Storage, is_remote, scratch_root

        local, tmp = str(ckpt_dir), None
        if is_remote(local):
            tmp = tempfile.mkdtemp(prefix=f"fleetrl-load-rank{self.rank}-", dir=scratch_root())
            Storage(storage_options).download_tree(str(ckpt_dir), tmp)
            local = tmp
        ckpt_engine = self.engine.checkpoint_engine
        unsafe_load = ckpt_engine.load
        ckpt_engine.load = _tensors_only_load
        try:
            path, client_state = self.engine.load_checkpoint(local, tag=tag, load_module_strict=self.lora is None)
        finally:
            ckpt_engine.load = unsafe_load
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if path is None:
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint in {ckpt_dir} (no 'latest' file or tag {tag!r}): "
                "point resume at a directory written by save_checkpoint"
            )
        return dict((client_state or {}).get(_CLIENT_KEY, {}))


def _safe_checkpoint_globals() -> list:
    """DeepSpeed's own small data classes inside its optimizer-state files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _tensors_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine `load` with weights_only=True (its own passes False)."""
    try:
        with torch.serialization.safe_globals(_safe_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError) naming the global
        if "weights_only" not in str(e).lower() and "unsupported global" not in str(e).lower():
            raise
        lines = str(e).splitlines()
        why = next((ln.strip() for ln in lines if "global" in ln.lower() and "weights_only" not in ln), lines[-1])
        raise RuntimeError(
            f"{path}: refused to load (it holds objects other than tensors and plain data): "
            f"{why[:300]}. Resume only from checkpoints fleetrl wrote; if this one is "
            "yours and a new DeepSpeed version stores a new class, add it to "
            "fleetrl.learner.engine._safe_checkpoint_globals") from None


def _bucket_checksums(bucket, flat: torch.Tensor, sums: dict, dtypes: dict, compute_s: list) -> None:
    """Checksums of one packed bucket's tensors, into ``sums`` / ``dtypes`` (run in the checksum thread)."""
    t0 = time.perf_counter()
    for name, t in unpack_bucket(bucket, flat):
        sums[name] = tensor_checksum(t)
        dtypes[name] = bucket.dtype
    compute_s.append(time.perf_counter() - t0)
