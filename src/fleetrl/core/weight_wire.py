"""The weight wire format between the learner (sender) and rollout workers (receivers).

A sync moves the policy's parameters in *buckets*: each bucket is one flat tensor of one
dtype holding several whole parameters back to back. The *plan* (which parameter lives
where in which bucket) is plain data: the learner makes it, the orchestrator hands the
same plan to every receiver, and both ends walk it in the same order, one broadcast per
bucket from rank 0 (the learner) of a side process group. Receivers must only apply
weights once every bucket of a version has arrived (a vLLM CPU engine mis-generates when
one layer's weights arrive over two reloads; see ENVIRONMENT.md).

Both ends keep their flat buffers from one sync to the next (``FlatBuffers``: a fresh 256 MiB
buffer costs several times a reused one) and post their broadcasts asynchronously: the sender
(``BucketSender``) packs bucket k+1 while bucket k is on the wire, the receivers
(``receive_buckets``, ``stream_buckets``) post every bucket's receive at once and can hand each
bucket on as soon as it is in. The same code runs over gloo (CPU) and NCCL (GPU): only the group's
backend and the buffers' device differ.

Only torch here: no Ray, no vLLM at import time, no fleetrl imports.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024  # learner.weight_sync_bucket_mb's default


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
    breaks: Collection[str] = (),
) -> WeightPlan:
    """Group (name, shape, dtype) in order into buckets of at most ``bucket_bytes``.

    A parameter bigger than ``bucket_bytes`` gets a bucket of its own, and one named in ``breaks``
    starts a new bucket. Order is kept, so parameters of one layer stay next to each other.
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
        if cur and (dtype != cur_dtype or (cur_numel + numel) * dtype.itemsize > bucket_bytes or name in breaks):
            close()
        cur_dtype = dtype
        cur.append(TensorSpec(name, shape, cur_numel))
        cur_numel += numel
    close()
    return WeightPlan(version=version, buckets=tuple(buckets), lora_scale=lora_scale)


def pack_bucket(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the bucket's parameters (looked up by name) into one flat tensor (``out`` when given)."""
    if out is None:
        flat = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=device)
    elif out.dtype != bucket.torch_dtype or out.shape != (bucket.numel,):
        raise ValueError(f"pack_bucket: out is {out.dtype} {tuple(out.shape)}, the bucket needs "
                         f"{bucket.torch_dtype} ({bucket.numel},): take it from FlatBuffers.get(key, bucket)")
    else:
        flat = out
    for spec in bucket.specs:
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"weight {spec.name}: shape {tuple(t.shape)} does not match the plan's {spec.shape}")
        flat[spec.offset : spec.offset + spec.numel].copy_(t.detach().reshape(-1))
    return flat


def memory_runs(named: Sequence[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """The names in memory order, grouped into runs of tensors that lie back to back in one storage
    with one dtype (DeepSpeed's ZeRO-1/2 keep each parameter group in one flat buffer this way)."""
    items = sorted(named, key=lambda nt: (nt[1].untyped_storage().data_ptr(), nt[1].storage_offset()))
    runs: list[list[str]] = []
    end = None  # (storage, dtype, element offset) where the current run would continue
    for name, t in items:
        here = (t.untyped_storage().data_ptr(), t.dtype, t.storage_offset())
        if runs and t.is_contiguous() and here == end:
            runs[-1].append(name)
        else:
            runs.append([name])
        end = here[:2] + (here[2] + t.numel(),) if t.is_contiguous() else None
    return runs


def contiguous_view(bucket: Bucket, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The bucket as one flat view of memory its tensors already fill back to back, in the bucket's
    layout (nothing to pack: it can go on the wire as it is); None when they do not."""
    first = tensors[bucket.specs[0].name]
    storage, base = first.untyped_storage(), first.storage_offset() - bucket.specs[0].offset
    for spec in bucket.specs:
        t = tensors[spec.name]
        if (t.dtype != bucket.torch_dtype or not t.is_contiguous() or tuple(t.shape) != spec.shape
                or t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != base + spec.offset):
            return None
    if base < 0 or (base + bucket.numel) * first.element_size() > storage.nbytes():
        return None
    return first.detach().new_empty(0).set_(storage, base, (bucket.numel,))


def unpack_bucket(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the bucket's named parameters (no copy)."""
    for spec in bucket.specs:
        yield spec.name, flat[spec.offset : spec.offset + spec.numel].view(spec.shape)


class FlatBuffers:
    """Flat buffers kept from one sync to the next, one per key (a bucket index or a ring slot).

    ``get(key, bucket)`` hands out the key's buffer again when it has the bucket's dtype and room for
    it (a view of its first ``bucket.numel`` elements), else allocates a new one for the key.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._bufs: dict[object, torch.Tensor] = {}

    def get(self, key: object, bucket: Bucket) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.dtype != bucket.torch_dtype or buf.numel() < bucket.numel:
            self._bufs.pop(key, None)  # the old one goes before the new one is allocated
            buf = self._bufs[key] = torch.empty(bucket.numel, dtype=bucket.torch_dtype, device=self.device)
        return buf[: bucket.numel]

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _wait(handle) -> None:
    """A collective's Work (``.wait()``) or a concurrent.futures.Future (``.result()``)."""
    if hasattr(handle, "wait"):
        handle.wait()
    else:
        handle.result()


class BucketSender:
    """Rank 0's end of a sync: bucket k+1 is packed while bucket k is on the wire.

    A ring of ``depth`` reused flat buffers; ``send`` waits until its slot's previous broadcast (and
    whatever ``reader`` started on it) is done, packs the bucket into the slot, then starts the
    broadcast without waiting for it. ``finish`` waits for everything still in flight.
    """

    def __init__(self, group, device: torch.device | str, depth: int = 2):
        if depth < 1:
            raise ValueError(f"BucketSender depth={depth}: at least 1 buffer")
        self.group = group
        self.depth = depth
        self.buffers = FlatBuffers(device)
        self._pending: dict[int, list] = {}
        self._count = 0
        self.unpacked = 0  # buckets sent straight from the tensors' own memory (contiguous_view)

    def _drain(self, slot: int) -> None:
        for h in self._pending.pop(slot, ()):
            _wait(h)

    def send(self, bucket: Bucket, tensors: dict[str, torch.Tensor], reader=None,
             in_place: bool = False) -> torch.Tensor:
        """Pack and start broadcasting one bucket; ``reader(flat)`` may return a Future that reads the
        packed bucket alongside the broadcast (e.g. checksums): the slot is reused only after it.

        ``in_place``: the tensors stay where they are until ``finish`` (not a temporary gather): a
        bucket they already fill back to back in memory goes on the wire from there, unpacked."""
        slot = self._count % self.depth
        self._count += 1
        self._drain(slot)
        # Only from memory on the wire's own device (gloo sends host memory: a GPU learner packs).
        on_wire = tensors[bucket.specs[0].name].device == self.buffers.device
        flat = contiguous_view(bucket, tensors) if in_place and on_wire else None
        if flat is None:
            flat = pack_bucket(bucket, tensors, out=self.buffers.get(slot, bucket))
        else:
            self.unpacked += 1
        handles = [self.group.broadcast(flat, 0)]
        if reader is not None:
            job = reader(flat)
            if job is not None:
                handles.append(job)
        self._pending[slot] = handles
        return flat

    def finish(self) -> float:
        """Wait for every broadcast still in flight, then for the readers; the next sync starts at slot
        0. Returns the seconds spent waiting for readers after the last broadcast was done."""
        try:
            for handles in self._pending.values():
                _wait(handles[0])
            t0 = time.perf_counter()
            for handles in self._pending.values():
                for h in handles[1:]:
                    _wait(h)
            return time.perf_counter() - t0
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Forget what is in flight (after a failed broadcast: the group is rebuilt before the next sync)."""
        self._pending.clear()
        self._count = 0


def receive_buckets(group, plan: WeightPlan, buffers: FlatBuffers) -> list[tuple[str, torch.Tensor]]:
    """A receiver's end of a sync: every bucket's receive posted at once into ``buffers`` (bucket i
    into key i, reused from the last sync), then waited for. Returns the named views, in plan order;
    they stay valid until the next call with the same ``buffers``."""
    return list(stream_buckets(group, plan, buffers))


def stream_buckets(group, plan: WeightPlan, buffers: FlatBuffers) -> Iterator[tuple[str, torch.Tensor]]:
    """``receive_buckets`` as it arrives: every receive is posted now, and the named views of bucket k
    are yielded as soon as bucket k is in, while the later ones are still on the wire. A consumer
    that loads as it iterates (vLLM's layerwise reload processes a layer once all its weights are
    in) overlaps the load with the receive."""
    flats = [buffers.get(i, b) for i, b in enumerate(plan.buckets)]
    works = [group.broadcast(flat, 0) for flat in flats]

    def arrivals() -> Iterator[tuple[str, torch.Tensor]]:
        for b, flat, work in zip(plan.buckets, flats, works):
            work.wait()
            yield from unpack_bucket(b, flat)

    return arrivals()


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
