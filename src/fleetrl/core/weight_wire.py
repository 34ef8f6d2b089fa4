"""The weight wire format between the learner (sender) and rollout workers (receivers).

A sync moves the policy's parameters in *buckets*: each bucket is one flat tensor of one
dtype holding several whole parameters back to back. The *plan* (which parameter lives
where in which bucket) is plain data: the learner makes it, the orchestrator hands the
same plan to every receiver, and both ends walk it in the same order, one broadcast per
bucket from rank 0 (the learner) of a side process group. Receivers must only apply
weights once every bucket of a version has arrived (a vLLM CPU engine mis-generates when
one layer's weights arrive over two reloads; see ENVIRONMENT.md).

Only torch here: no Ray, no vLLM at import time, no fleetrl imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, inside its bucket

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Bucket:
    dtype: str  # e.g. "float32"; a string so the plan pickles and prints plainly
    numel: int
    specs: tuple[TensorSpec, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class WeightPlan:
    """Everything a receiver needs to rebuild one version of the weights."""

    version: int
    buckets: tuple[Bucket, ...]
    # Set when the plan carries only a LoRA adapter (`<module>.lora_A.weight` / `.lora_B.weight`):
    # the receiver merges W = W_base + lora_scale * B @ A into base weights it keeps (merge_lora).
    lora_scale: float | None = None

    @property
    def num_bytes(self) -> int:
        return sum(b.numel * b.torch_dtype.itemsize for b in self.buckets)


def plan_buckets(
    params: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    version: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    lora_scale: float | None = None,
) -> WeightPlan:
    """Group (name, shape, dtype) in order into buckets of at most ``bucket_bytes``.

    A parameter bigger than ``bucket_bytes`` gets a bucket of its own. Order is kept, so
    parameters of one layer stay next to each other.
    """
    buckets: list[Bucket] = []
    cur: list[TensorSpec] = []
    cur_dtype: torch.dtype | None = None
    cur_numel = 0

    def close() -> None:
        nonlocal cur, cur_numel
        if cur:
            buckets.append(Bucket(str(cur_dtype).removeprefix("torch."), cur_numel, tuple(cur)))
        cur, cur_numel = [], 0

    for name, shape, dtype in params:
        shape = tuple(int(d) for d in shape)
        numel = 1
        for d in shape:
            numel *= d
        if cur and (dtype != cur_dtype or (cur_numel + numel) * dtype.itemsize > bucket_bytes):
            close()
        cur_dtype = dtype
        cur.append(TensorSpec(name, shape, cur_numel))
        cur_numel += numel
    close()
    return WeightPlan(version=version, buckets=tuple(buckets), lora_scale=lora_scale)


def pack_bucket(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Copy the bucket's parameters (looked up by name) into one flat tensor."""
    flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device)
    for spec in bucket.specs:
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"weight {spec.name}: shape {tuple(t.shape)} does not match the plan's {spec.shape}")
        flat[spec.offset : spec.offset + spec.numel].copy_(t.detach().reshape(-1))
    return flat


def unpack_bucket(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the bucket's named parameters (no copy)."""
    for spec in bucket.specs:
        yield spec.name, flat[spec.offset : spec.offset + spec.numel].view(spec.shape)


def merge_lora(base: dict[str, torch.Tensor], adapter: Iterable[tuple[str, torch.Tensor]],
               scale: float) -> dict[str, torch.Tensor]:
    """New tensors ``W_base + scale * B @ A`` for every module the adapter touches.

    ``base`` maps Hugging Face names to the BASE weights (never an already merged copy: each
    version is merged from the base, so versions do not pile up); ``adapter`` yields
    ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r]. The sum is taken in
    float32 and cast to the base weight's dtype.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in adapter:
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name.removesuffix(suffix), {})[part] = t
                break
        else:
            raise ValueError(f"adapter tensor {name!r} is neither <module>.lora_A.weight nor <module>.lora_B.weight")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter module {module!r} has only {sorted(ab)}: both lora_A and lora_B must be sent")
        key = f"{module}.weight"
        if key not in base:
            raise KeyError(f"adapter module {module!r} has no base weight {key!r} in the base model")
        w = base[key]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        if delta.shape != w.shape:
            raise ValueError(f"adapter {module!r}: B @ A has shape {tuple(delta.shape)}, base weight {tuple(w.shape)}")
        out[key] = (w.float() + scale * delta).to(w.dtype)
    return out


def init_side_group(host: str, port: int, rank: int, world_size: int, backend: str):
    """A process group of its own (gloo on CPU, nccl on GPU) next to any default group.

    Rank 0 is the learner, ranks 1.. are the vLLM workers. Uses vLLM's stateless helper,
    which leaves torch.distributed's default group alone (DeepSpeed and vLLM each own one).
    """
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    listen = None
    if rank == 0:
        # Bound to the announced address: a store created from host/port alone listens on every
        # interface. vLLM's helper takes ownership of the socket.
        import socket

        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listen = socket.create_server((host, port), family=family)
    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend,
                                                          listen_socket=listen)


def broadcast(group, tensor: torch.Tensor, src: int = 0) -> None:
    """Broadcast ``tensor`` in place from ``src`` over a group made by ``init_side_group``."""
    group.broadcast(tensor, src).wait()
