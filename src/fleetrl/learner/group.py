"""`LearnerGroup`: the DeepSpeed ranks of one learner as Ray actors in one placement group.

Ray is only the transport: each actor is a `Learner` (learner/rank.py) running one objective
(the policy by default; the critic and offline groups name theirs). The group
splits batches across ranks, fans every call out to all ranks (they run collectives
together) and gathers the answers. Weight-sync calls return ObjectRefs, because the vLLM
receivers must join and receive at the same time as the learner sends.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fleetrl.core.console import quiet_env
from fleetrl.core.waits import wait_all
from fleetrl.core.weight_wire import WeightPlan
from fleetrl.learner.config import LearnerConfig, micro_steps_per_mini_batch
from fleetrl.learner.deepspeed_utils import free_port


def learner_env(cfg: LearnerConfig, num_gpus: float) -> dict[str, str]:
    """Environment of a rank's process, set before DeepSpeed is imported there."""
    env = {
        # One rank gets num_cpus_per_rank cores; more OpenMP threads than that only thrash.
        "OMP_NUM_THREADS": str(cfg.cpu_threads()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not num_gpus:
        # Without it DeepSpeed probes for CUDA and, on a GPU node, would pick it for a CPU rank.
        env["DS_ACCELERATOR"] = "cpu"
    return env


def rank_resources(cfg: LearnerConfig) -> dict[str, float]:
    """Ray resources of one rank; num_gpus_per_rank None = 1 GPU when the cluster has GPUs, else 0."""
    import ray

    gpus = cfg.num_gpus_per_rank
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    out = {"CPU": float(cfg.num_cpus_per_rank), **{k: float(v) for k, v in cfg.resources_per_rank.items()}}
    if gpus:
        out["GPU"] = float(gpus)
    return out


def _node_address() -> tuple[str, int]:
    """This node's IP and a port free on it (run inside the placement group's first bundle)."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def role_setting(role: str) -> str:
    """The config section of a group's role (``learner``, ``critic``, ``reference``...), for messages."""
    return role if role in ("learner", "critic") else "learner"


def _split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """`parts` contiguous, equal shards (the row count must divide)."""
    n = next(iter(batch.values())).shape[0]
    size = n // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


class LearnerGroup:
    def __init__(
        self,
        cfg: LearnerConfig | dict,
        model_path: str | os.PathLike,
        total_steps: int | None = None,
        mini_batch_size: int | None = None,
        name_prefix: str = "",
        ready_timeout_s: float = 900.0,
        learner_cls: type | None = None,
        learner_kwargs: dict[str, Any] | None = None,
        role: str = "learner",
        reserve: dict[str, float] | None = None,
        colocate_with: LearnerGroup | None = None,
        wait: bool = True,
    ):
        """Start `cfg.num_ranks` actors named `{name_prefix}{role}-rank-{i}` and wait until all are built.

        `mini_batch_size` (global sequences per optimizer step) and `total_steps` (optimizer
        steps of the run) are fixed here; see Engine. `learner_cls` (default `Learner`) is what
        each rank runs; `learner_kwargs` go to its constructor after the engine's arguments
        (e.g. {"objective": "critic", "objective_cfg": {...}}).

        Colocation: `reserve` adds these resources to every rank's bundle, room for the ranks of a
        group built later with `colocate_with=this group`, which places its rank i in bundle i
        (same node) instead of making a placement group of its own.

        `wait=False` returns once the actors are created; `wait_ready()` then waits for their
        models (so two groups can load side by side).
        """
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from fleetrl.learner.rank import Learner

        self.cfg = cfg if isinstance(cfg, LearnerConfig) else LearnerConfig.model_validate(cfg)
        cfg = self.cfg
        self.num_ranks = cfg.num_ranks
        self.mini_batch_size = mini_batch_size or cfg.micro_batch_size * cfg.num_ranks
        # Fail here, in the driver, rather than in every actor.
        micro_steps_per_mini_batch(self.mini_batch_size, self.num_ranks, cfg.micro_batch_size)
        bundle = rank_resources(cfg)
        gpus = bundle.get("GPU", 0)
        self.num_gpus_per_rank = gpus
        for key, amount in (reserve or {}).items():
            bundle[key] = bundle.get(key, 0.0) + float(amount)
        self.name_prefix = name_prefix
        self.role = role
        self._ready_timeout_s = ready_timeout_s
        if colocate_with is not None:
            if colocate_with.num_ranks != self.num_ranks:
                raise ValueError(
                    f"{role} has {self.num_ranks} ranks but colocates with {colocate_with.role}'s "
                    f"{colocate_with.num_ranks}: rank i shares bundle i, so the counts must match"
                )
            self._pg, self._owns_pg = colocate_with._pg, False
        else:
            self._pg, self._owns_pg = placement_group([dict(bundle) for _ in range(self.num_ranks)],
                                                      strategy="PACK", name=f"{name_prefix}{role}"), True
            ready, _ = ray.wait([self._pg.ready()], timeout=ready_timeout_s)
            if not ready:
                ray.util.remove_placement_group(self._pg)
                raise TimeoutError(
                    f"the {role}'s placement group ({self.num_ranks} x {bundle}) was not placed within "
                    f"{ready_timeout_s:.0f}s; the cluster has {ray.cluster_resources()}: "
                    f"lower {role}.num_ranks, "
                    f"{role}.num_cpus_per_rank or {role}.num_gpus_per_rank, or add nodes"
                )
        self._in_bundle = lambda i: PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
        self._node_address = ray.remote(num_cpus=0)(_node_address)
        master_addr, master_port = self._address_of_rank0()

        remote_cls = ray.remote(learner_cls or Learner)
        env = {**quiet_env(), **learner_env(cfg, gpus)}  # library noise off unless --verbose
        self.actors = [
            remote_cls.options(
                name=f"{name_prefix}{role}-rank-{i}",
                num_cpus=cfg.num_cpus_per_rank,
                num_gpus=gpus,
                resources=dict(cfg.resources_per_rank) or None,
                scheduling_strategy=self._in_bundle(i),
                runtime_env={"env_vars": env},
            ).remote(cfg, str(model_path), i, self.num_ranks, master_addr, master_port,
                     total_steps, self.mini_batch_size, **(learner_kwargs or {}))
            for i in range(self.num_ranks)
        ]
        self._info_refs = [a.info.remote() for a in self.actors]
        self.rank_info: list[dict[str, Any]] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> list[dict[str, Any]]:
        """Every rank's `info()` once its model and engine are built; a failing rank shuts the group down."""
        if not self.rank_info:
            try:
                self.rank_info = self._gather(self._info_refs, timeout_s=self._ready_timeout_s,
                                              what=f"building the {self.role}'s models and engines")
            except BaseException:
                self.shutdown()
                raise
        return self.rank_info

    # ------------------------------------------------------------------ fan-out helpers

    def _address_of_rank0(self) -> tuple[str, int]:
        ref = self._node_address.options(scheduling_strategy=self._in_bundle(0)).remote()
        return wait_all([ref], [f"a task in {self.role} rank 0's bundle"], self._ready_timeout_s,
                        f"the {role_setting(self.role)} start-up (asking rank 0's node for its address)",
                        "the placement group is placed, so its node is overloaded or lost: check the "
                        "Ray dashboard")[0]

    def rank_names(self) -> list[str]:
        """The actor name of each rank, for messages."""
        return [f"{self.name_prefix}{self.role}-rank-{i}" for i in range(self.num_ranks)]

    def _gather(self, refs: list, timeout_s: float | None = None, what: str | None = None) -> list:
        """Results in order; the first failing rank's error is raised at once.

        Fail fast because the healthy ranks of a failed collective call would wait forever. One
        deadline for the whole call (default ``call_timeout_s`` of the config): a TimeoutError
        names the ranks that did not answer.
        """
        timeout_s = self.cfg.call_timeout_s if timeout_s is None else timeout_s
        what = what or f"a call of the {self.role} ranks ({role_setting(self.role)}.call_timeout_s)"
        return wait_all(refs, self.rank_names()[:len(refs)], timeout_s, what,
                        "a rank stuck in a collective holds up the others")

    def _call_all(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def _check_rows(self, batch: dict[str, torch.Tensor], multiple: int, what: str) -> int:
        n = next(iter(batch.values())).shape[0]  # input_ids, or chosen_input_ids of pair batches
        if n == 0 or n % multiple:
            raise ValueError(f"{what}: the batch has {n} sequences, not a positive multiple of {multiple}")
        return n

    # ------------------------------------------------------------------ API

    def side_group_address(self) -> tuple[str, int]:
        """Host and free port on rank 0's node, where the weight-sync side group meets."""
        return self._address_of_rank0()

    def train(
        self,
        batch: dict[str, torch.Tensor],
        mini_batch_size: int | None = None,
        epochs: int = 1,
        temperature: float = 1.0,
    ) -> list[dict[str, float]]:
        """One optimizer step per global mini-batch per epoch; returns rank 0's stats (same on all ranks).

        Rank i trains on rows [i*B/R, (i+1)*B/R); global mini-batch j is the j-th per-rank
        slice of every shard.
        """
        return self.finish(self.start_train(batch, mini_batch_size, epochs, temperature))

    def start_train(
        self,
        batch: dict[str, torch.Tensor],
        mini_batch_size: int | None = None,
        epochs: int = 1,
        temperature: float = 1.0,
    ) -> list:
        """`train` without waiting: ObjectRefs to pass to `finish` (another group may train meanwhile)."""
        mini = mini_batch_size or self.mini_batch_size
        if mini != self.mini_batch_size:
            raise ValueError(f"train(mini_batch_size={mini}) but the group was built with "
                             f"mini_batch_size={self.mini_batch_size}")
        self._check_rows(batch, mini, f"{self.role}.train(mini_batch_size={mini})")
        shards = _split_rows(batch, self.num_ranks)
        return [a.train.remote(s, mini, epochs, temperature) for a, s in zip(self.actors, shards)]

    def finish(self, refs: list) -> Any:
        """Rank 0's answer of a call started on every rank (they all answer the same)."""
        return self._gather(refs)[0]

    def _padded_shards(self, batch: dict[str, torch.Tensor],
                       keys: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
        """One shard per rank of `keys`, rows padded (last row repeated) to a multiple of the rank
        count: ZeRO-3 ranks gather parameters together, so they must run the same forwards."""
        n = batch["input_ids"].shape[0]
        pad = (-n) % self.num_ranks
        rows = {k: batch[k] for k in keys}
        if pad:
            rows = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in rows.items()}
        return _split_rows(rows, self.num_ranks)

    def compute_logprobs(
        self, batch: dict[str, torch.Tensor], which: str = "policy", temperature: float = 1.0
    ) -> torch.Tensor:
        """[B, T] log-probs; rows are padded to a multiple of the rank count (ZeRO-3 needs equal shards)."""
        n = batch["input_ids"].shape[0]
        if n == 0:
            return torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        return self.finish_logprobs(self.start_compute_logprobs(batch, which, temperature), n)

    def start_compute_logprobs(self, batch: dict[str, torch.Tensor], which: str = "policy",
                               temperature: float = 1.0) -> list:
        """compute_logprobs without waiting: each rank's ref; ``torch.cat`` of their results, cut to
        the batch's rows, is the answer. Calls queued behind it see the weights it scored."""
        shards = self._padded_shards(batch, ("input_ids", "attention_mask"))
        return [a.compute_logprobs.remote(s, which, temperature) for a, s in zip(self.actors, shards)]

    def finish_logprobs(self, refs: list, rows: int, timeout_s: float | None = None) -> torch.Tensor:
        """The [rows, T] log-probs of a ``start_compute_logprobs``."""
        return torch.cat(self._gather(refs, timeout_s))[:rows]

    def weight_plan(self, version: int, dtype: str | None = None, bucket_mb: int | None = None) -> WeightPlan:
        return self._gather([self.actors[0].weight_plan.remote(version, dtype, bucket_mb)])[0]

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str) -> list:
        """ObjectRefs (rank 0 joins the side group; it returns once every receiver joined too)."""
        return self._call_all("init_weight_sync", host, port, world_size, backend)

    def send_weights(self, plan: WeightPlan, checksums: bool = False) -> list:
        """ObjectRefs of every rank's send (ZeRO-3 ranks help gather); wait on them with the receivers'.
        ``checksums``: rank 0's result holds each sent tensor's checksum."""
        return self._call_all("send_weights", plan, checksums)

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        return self._gather(self._call_all("gathered_state_dict"))[0]

    def memory(self) -> list[dict[str, int]]:
        """Each rank's `Engine.memory()` (parameter, trainable and optimizer-state bytes)."""
        return self._gather(self._call_all("memory"))

    def save_hf(self, out_dir: str | os.PathLike, storage_options: dict | None = None) -> None:
        """Rank 0 writes the model and its manifest into `out_dir` (local path or URI)."""
        self._gather(self._call_all("save_hf", str(out_dir), storage_options))

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, client_state: dict | None = None,
                        storage_options: dict | None = None) -> None:
        """Every rank writes its shard locally, then moves/uploads it into `ckpt_dir` (a shared path or
        URI) with its manifest; fleetrl.core.storage.verify_complete checks them all."""
        self._gather(self._call_all("save_checkpoint", str(ckpt_dir), client_state, None, storage_options))

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, storage_options: dict | None = None) -> dict[str, Any]:
        return self._gather(self._call_all("load_checkpoint", str(ckpt_dir), None, storage_options))[0]

    def shutdown(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        if getattr(self, "_pg", None) is not None and getattr(self, "_owns_pg", True):
            ray.util.remove_placement_group(self._pg)
        self._pg = None
