"""DeepSpeed plumbing kept apart from the training logic: config dicts, LR schedule, env setup.

Importing this module does not import DeepSpeed (the config builders are plain dict work and
are unit-tested without it).
"""

from __future__ import annotations

import copy
import math
import os
import socket
from collections.abc import Callable
from typing import Any

from fleetrl.learner.config import LearnerConfig

# Effectively "never": DeepSpeed's own progress prints would interleave across ranks.
_NO_PRINT = 10**9


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: nested dicts merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "bfloat16":
        return {"bf16": {"enabled": True}}
    if dtype == "float16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}  # dynamic scale
    return {}


def train_ds_config(
    cfg: LearnerConfig,
    world_size: int,
    grad_accum_steps: int,
    dtype: str,
    on_gpu: bool,
) -> dict[str, Any]:
    """The DeepSpeed config of the trained policy; `cfg.deepspeed_config` is merged last."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        # On CPU we hand DeepSpeed a torch AdamW; ZeRO refuses client optimizers without this.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NO_PRINT,
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }
    if cfg.optimizer == "adamw" and (on_gpu or cfg.offload_optimizer):
        # DeepSpeed's own Adam: fused on GPU, its CPU Adam when the optimizer is offloaded.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.adam_betas),
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
            },
        }
    return deep_merge(ds, cfg.deepspeed_config)


def client_optimizer(cfg: LearnerConfig, param_groups: list[dict[str, Any]]):
    """The torch optimizer handed to DeepSpeed when its config names none (CPU AdamW, or RMSprop)."""
    import torch

    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=cfg.lr, alpha=0.99, eps=cfg.adam_eps)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


def reference_ds_config(cfg: LearnerConfig, world_size: int, dtype: str) -> dict[str, Any]:
    """Config of the frozen reference under ZeRO-3: no optimizer, params partitioned like the policy's."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "zero_optimization": {"stage": 3},
        "steps_per_print": _NO_PRINT,
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }
    zero_user = cfg.deepspeed_config.get("zero_optimization", {})
    # Keep the user's ZeRO-3 tuning (e.g. param offload) for the reference too, minus optimizer bits.
    extra = {k: v for k, v in zero_user.items() if k not in ("stage", "offload_optimizer")}
    return deep_merge(ds, {"zero_optimization": extra})


def lr_lambda(cfg: LearnerConfig, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step `step`: linear warm-up, then constant or cosine."""
    warmup = cfg.lr_warmup_steps
    if cfg.lr_schedule == "cosine" and not total_steps:
        raise ValueError(
            "learner.lr_schedule is 'cosine' but the learner was built without total_steps: pass the "
            "run's number of optimizer steps (Learner(total_steps=...)) or use lr_schedule: constant"
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos

    return factor


def init_default_group(backend: str, rank: int, world_size: int, master_addr: str, master_port: int,
                       device: Any = None) -> None:
    """torch.distributed's default group, with rank 0's store server bound to ``master_addr`` only.

    The env:// rendezvous DeepSpeed would do makes rank 0's TCPStore listen on every interface
    (checked: '::'); a socket bound to the announced address keeps a loopback run on loopback and a
    cluster run on the address its peers are given. `deepspeed.init_distributed` then finds the
    group initialized and uses it. ``device``: the rank's torch device."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    listen_fd = None
    if rank == 0:
        family = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)[0][0]
        listen_fd = socket.create_server((master_addr, master_port), family=family).detach()  # the store owns it
    timeout = dist.constants.default_pg_timeout
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout,
                          master_listen_fd=listen_fd, use_libuv=True)
    kwargs = {}
    if device is not None and device.type == "cuda" and world_size > 1:
        kwargs["device_id"] = device  # as DeepSpeed does on CUDA
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)


def set_dist_env(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int) -> None:
    """The env:// rendezvous variables torch.distributed and DeepSpeed read."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", "1"),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce op.

    On the CPU accelerator `deepspeed.init_distributed` JIT-builds `deepspeed_shm_comm` with gcc
    (~80 s on a 2-core machine the first time, cached in ~/.cache/torch_extensions). That op only
    serves inference all-reduce (tensor-parallel inference), which training never calls;
    gloo does the ZeRO collectives. DeepSpeed builds an op only if `__compatible_ops__` says it
    is compatible, and that dict is cached in the module, so marking it off is enough.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def free_port(host: str = "") -> int:
    """A TCP port free on this node right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
