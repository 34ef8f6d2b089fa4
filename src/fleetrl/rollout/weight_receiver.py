"""The receiving end of a weight sync, run inside every vLLM worker process.

vLLM mixes ``WeightReceiver`` into its worker class (``worker_extension_cls``), so ``self``
is the vLLM worker: ``self.model_runner`` owns the model and ``self.rank`` is the worker's
rank inside its engine (its tensor-parallel rank). ``RolloutWorker`` reaches these
methods with ``llm.collective_rpc``, whose arguments are not pickled (tensors turn into
lists), so the plan travels as plain data (``plan_to_plain``) and the weights themselves
over the side process group.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from fleetrl.core.weight_check import FAULT_ENV, apply_fault, parse_fault, tensor_checksum
from fleetrl.core.weight_wire import (
    Bucket,
    FlatBuffers,
    TensorSpec,
    WeightPlan,
    init_side_group,
    merge_lora,
    stream_buckets,
    unpack_bucket,
)

# The start of the message of a reload that failed after it began: the model may hold a mix of two
# versions, so the worker must not serve again (RolloutWorker turns it into EngineDead: replaced).
PARTIAL_RELOAD = "fleetrl: weight reload interrupted"


def load_base_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face checkpoint directory (its *.safetensors files), on the CPU."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"LoRA weight sync: no *.safetensors in {model_dir}; the fleet merges adapters into the base "
            "weights it reads from there, so the model directory must hold safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def write_peft_adapter(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                       scale: float) -> Path:
    """A LoRA adapter in PEFT's saved format, from the wire's tensors: what vLLM's LoRARequest loads.

    ``tensors`` are ``<module>.lora_A.weight`` [r, in] / ``<module>.lora_B.weight`` [out, r] under
    Hugging Face module names (``fleetrl.learner.lora.wire_name``); ``scale`` is the plan's lora_scale
    (alpha / r). Writes adapter_model.safetensors (PEFT's ``base_model.model.`` prefix) and
    adapter_config.json (r, lora_alpha = scale * r, target_modules = the modules' last names) into a
    sibling temp directory first, then renames it: a reader never sees half an adapter.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights, ranks, targets = {}, set(), set()
    for name, t in tensors:
        module, sep, part = name.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter tensor {name!r} is neither <module>.lora_A.weight nor <module>.lora_B.weight")
        if part == "A.weight":
            ranks.add(int(t.shape[0]))
        targets.add(module.rsplit(".", 1)[-1])
        # A copy of its own: the wire's tensors are views of one flat bucket, which safetensors refuses.
        weights[f"base_model.model.{name}"] = t.detach().to("cpu").contiguous().clone()
    if not weights:
        raise ValueError("write_peft_adapter: the plan holds no adapter tensors")
    if len(ranks) != 1:
        raise ValueError(f"adapter tensors of several ranks {sorted(ranks)}: vLLM serves one rank per adapter")
    r = ranks.pop()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "modules_to_save": None,
    }, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def plan_to_plain(plan: WeightPlan) -> dict[str, Any]:
    """A plan as dicts, lists, str and int only (survives vLLM's rpc serialization)."""
    return {
        "version": plan.version,
        "lora_scale": plan.lora_scale,
        "buckets": [
            {
                "dtype": b.dtype,
                "numel": b.numel,
                "specs": [[s.name, list(s.shape), s.offset] for s in b.specs],
            }
            for b in plan.buckets
        ],
    }


def plan_from_plain(data: dict[str, Any]) -> WeightPlan:
    buckets = tuple(
        Bucket(
            dtype=b["dtype"],
            numel=int(b["numel"]),
            specs=tuple(TensorSpec(str(n), tuple(int(d) for d in shape), int(off)) for n, shape, off in b["specs"]),
        )
        for b in data["buckets"]
    )
    scale = data.get("lora_scale")
    return WeightPlan(version=int(data["version"]), buckets=buckets,
                      lora_scale=None if scale is None else float(scale))


def refresh_tied_layers(model: torch.nn.Module, vllm_config) -> int:
    """Re-run post-load processing of layers that share their weight with another layer.

    A tied ``lm_head`` gets no weights of its own in a reload (its checkpoint name is
    skipped), so vLLM never re-processes it; on the CPU backend that processing packs the
    weight for its GEMM, and the head would keep computing logits from the OLD embedding.
    The shared tensor itself holds the new values, so processing it again is enough.
    Returns how many layers were refreshed.
    """
    from vllm.config import set_current_vllm_config

    by_storage: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if isinstance(weight, torch.Tensor) and weight.numel() > 0 and method is not None:
            by_storage.setdefault(weight.data_ptr(), []).append(module)
    refreshed = 0
    with set_current_vllm_config(vllm_config):
        for modules in by_storage.values():
            if len(modules) < 2:
                continue
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


class WeightReceiver:
    """vLLM worker extension: join the learner's side group, take new weights from it."""

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> int:
        """Join the side group as rank ``rank_offset + tp_rank``; blocks until every rank joins."""
        rank = rank_offset + int(self.rank)
        self._fleetrl_weight_group = init_side_group(host, int(port), rank, int(world_size), backend)
        return rank

    def _receive_buckets(self, plan: WeightPlan) -> Iterator[tuple[str, torch.Tensor]]:
        """Every bucket's receive posted now; the named views come as their buckets arrive."""
        group = getattr(self, "_fleetrl_weight_group", None)
        if group is None:
            raise RuntimeError(
                "receive_weights called before init_weight_group on this vLLM worker: "
                "call RolloutWorker.init_weight_group (or RolloutFleet.init_weight_group) first"
            )
        # One buffer per bucket (a version is reloaded only once all of it has arrived), kept from one
        # sync to the next in host memory (_release_buffers_off_cpu); the reload copies out of them.
        buffers = self.__dict__.get("_fleetrl_weight_buffers")
        if buffers is None or buffers.device != torch.device(self.model_runner.device):
            buffers = self._fleetrl_weight_buffers = FlatBuffers(self.model_runner.device)
        self._fleetrl_last_plan = plan
        return stream_buckets(group, plan, buffers)

    def _release_buffers_off_cpu(self) -> None:
        # Kept between syncs only in host memory: on an accelerator a whole extra copy of the weights
        # would sit in the memory vLLM sized its KV cache for, so it is freed once the reload copied it.
        buffers = self.__dict__.get("_fleetrl_weight_buffers")
        if buffers is not None and buffers.device.type != "cpu":
            del self._fleetrl_weight_buffers

    def receive_adapter(self, plan_data: dict[str, Any], out_dir: str) -> dict[str, float]:
        """rollout.lora_sync: adapter. Receive one adapter version and write it as a PEFT adapter
        directory at ``out_dir`` for the engine's LoRARequest; the model itself is not touched.
        Every rank takes the broadcast; rank 0 writes (an engine's ranks share one machine's disk)."""
        plan = plan_from_plain(plan_data)
        if plan.lora_scale is None:
            raise ValueError("receive_adapter got a full-weight plan: rollout.lora_sync: adapter needs learner.lora")
        t0 = time.perf_counter()
        weights = list(self._receive_buckets(plan))
        t1 = time.perf_counter()
        if int(self.rank) == 0:
            write_peft_adapter(out_dir, weights, plan.lora_scale)
        self._release_buffers_off_cpu()
        return {"receive_s": t1 - t0, "write_s": time.perf_counter() - t1, "bytes": float(plan.num_bytes)}

    def loaded_checksums(self) -> dict[str, list]:
        """Checksums of the model's parameters as loaded (read back after the reload), each with its
        dtype and the Hugging Face names it holds (``fleetrl.core.weight_check``)."""
        from fleetrl.core.weight_check import unfuse_name

        model = self.model_runner.get_model()
        packed = getattr(model, "packed_modules_mapping", None) or {}
        out = {}
        for name, p in model.named_parameters():
            # Empty: the CPU backend packed this linear weight for oneDNN and dropped the tensor.
            readable = p.numel() > 0 and not p.is_meta
            out[name] = [list(tensor_checksum(p)) if readable else None, str(p.dtype).removeprefix("torch."),
                         unfuse_name(name, packed)]
        return out

    def _fault(self, version: int) -> str | None:
        """Tests only: the fault FLEETRL_WEIGHT_FAULT asks for on this sync (each kind@version once)."""
        done = self.__dict__.setdefault("_fleetrl_faults_done", set())
        for kind, at in parse_fault(os.environ.get(FAULT_ENV)):
            if (at is None or at == version) and (kind, version) not in done:
                done.add((kind, version))
                return kind
        return None

    def receive_weights(self, plan_data: dict[str, Any], verify: bool = False) -> dict[str, Any]:
        """Receive every bucket of one version and load them in ONE reload, as they arrive.

        One reload for the whole model because the vLLM CPU backend mis-generates when one
        layer's weights come over two reloads (ENVIRONMENT.md). Within it, vLLM's layerwise
        reload processes each layer as soon as all its weights are in, so the weights go to
        it as their buckets arrive: the load of bucket k overlaps the receive of bucket k+1.
        The price is one extra copy of the weights (the receive buffers).
        """
        plan = plan_from_plain(plan_data)
        device = self.model_runner.device
        t0 = time.perf_counter()
        fault = self._fault(plan.version)
        arrivals = _Arrivals(self._receive_buckets(plan))
        weights: Iterable[tuple[str, torch.Tensor]] = arrivals
        if plan.lora_scale is not None:
            # Adapter only on the wire: merge it into the BASE weights (kept from the checkpoint, never
            # the merged ones, so each version replaces the last) and reload the whole model at once.
            adapter = list(arrivals)
            base = getattr(self, "_fleetrl_base_weights", None)
            if base is None:
                base = self._fleetrl_base_weights = load_base_weights(self.vllm_config.model_config.model)
            merged = merge_lora(base, adapter, plan.lora_scale)
            weights = [(name, merged.get(name, t)) for name, t in base.items()]
        if fault is not None:
            weights = apply_fault(fault, list(weights))
        try:
            self._reload(weights)
        except Exception as e:
            if arrivals.began:  # some layers hold the new version, others the old (or none)
                raise RuntimeError(f"{PARTIAL_RELOAD} at weight version {plan.version}: {type(e).__name__}: "
                                   f"{e}") from e
            raise
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._release_buffers_off_cpu()
        t2 = time.perf_counter()
        t1 = arrivals.last or t2
        # receive_s: until the last bucket was in; reload_s: the rest of the reload after it (the
        # part that did not overlap the receive).
        out: dict[str, Any] = {"receive_s": t1 - t0, "reload_s": t2 - t1, "bytes": float(plan.num_bytes),
                               "t_receive_start": t0, "t_reload_end": t2}
        if fault is not None:
            out["fault"] = fault
        if verify:
            out["loaded"] = self.loaded_checksums()
            out["verify_s"] = time.perf_counter() - t2
        return out

    def _reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The worker's reload_weights wraps model_runner.reload_weights in the engine's
        # config context (vLLM's in-place reload: checkpoint-format names, i.e. Hugging Face
        # names, re-run through the model's load_weights and post-load processing such as
        # the CPU backend's weight repacking). GPU and CPU runners share this method.
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        refresh_tied_layers(self.model_runner.get_model(), self.vllm_config)

    def time_reload(self) -> float:
        """Benches: one more reload of the last version received, from the kept receive buffers (host
        memory), all of it already there; its seconds (the reload alone, nothing to overlap)."""
        plan = self.__dict__.get("_fleetrl_last_plan")
        buffers = self.__dict__.get("_fleetrl_weight_buffers")
        if plan is None or buffers is None or plan.lora_scale is not None:
            raise RuntimeError("time_reload needs a full-weight sync first (and buffers kept in host memory)")
        views = [named for i, b in enumerate(plan.buckets) for named in unpack_bucket(b, buffers.get(i, b))]
        t0 = time.perf_counter()
        self._reload(views)
        return time.perf_counter() - t0


class _Arrivals:
    """Wraps the arriving named tensors: whether the consumer began taking them, when the last came."""

    def __init__(self, named: Iterator[tuple[str, torch.Tensor]]):
        self._named = named
        self.began = False
        self.last: float | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.began = True
        yield from self._named
        self.last = time.perf_counter()
