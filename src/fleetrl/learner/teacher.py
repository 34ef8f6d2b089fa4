"""The teacher service of on-policy distillation (opd): a frozen causal LM that returns the token
log-probs of sampled completions, in its own Ray actors (``teacher:`` config section).

Forward-only: plain Hugging Face model in eval mode, no optimizer, no DeepSpeed; it reuses the
learner's forward (learner/forward.py token_logps), so its log-probs are aligned exactly as the
policy's are ([B, T], 0 on tokens without context). `TeacherGroup` splits a batch's rows over its
actors and gathers with one deadline (teacher.call_timeout_s).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fleetrl.core.waits import wait_all
from fleetrl.learner.forward import micro_batches, token_logps
from fleetrl.learner.teacher_config import TeacherConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Teacher:
    """One teacher actor: the frozen model on this actor's device."""

    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 16):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.model_path = model_path

    def info(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "device": str(self.device), "pid": os.getpid()}

    @torch.no_grad()
    def compute_logprobs(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, T] fp32 CPU log-probs of batch["input_ids"] (each token given the ones before it)."""
        rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = [token_logps(self.model, m["input_ids"], m["attention_mask"], self.device, temperature)[0].float().cpu()
               for m in micro_batches(rows, self.micro_batch_size)]
        return torch.cat(out) if out else torch.zeros(batch["input_ids"].shape)


class TeacherGroup:
    """`cfg.num_actors` Teacher actors named `{name_prefix}teacher-{i}`; waits until all loaded."""

    def __init__(self, cfg: TeacherConfig, model_path: str, name_prefix: str = "", wait: bool = True):
        import ray

        self.cfg = cfg
        self.names = [f"{name_prefix}teacher-{i}" for i in range(cfg.num_actors)]
        remote = ray.remote(Teacher)
        self.actors = [remote.options(name=n, num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
                       .remote(model_path, cfg.dtype, cfg.micro_batch_size) for n in self.names]
        self._info_refs = [a.info.remote() for a in self.actors]
        self.info: list[dict[str, Any]] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> list[dict[str, Any]]:
        if not self.info:
            try:
                self.info = wait_all(self._info_refs, self.names, self.cfg.ready_timeout_s,
                                     "loading the teacher (teacher.ready_timeout_s)")
            except BaseException:
                self.shutdown()
                raise
        return self.info

    def compute_logprobs(self, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """[B, T] teacher log-probs of the batch, rows split over the actors."""
        n = batch["input_ids"].shape[0]
        size = -(-n // len(self.actors))
        shards = [(i, min(i + size, n)) for i in range(0, n, size)]
        refs = [a.compute_logprobs.remote({k: batch[k][lo:hi] for k in ("input_ids", "attention_mask")}, temperature)
                for a, (lo, hi) in zip(self.actors, shards)]
        parts = wait_all(refs, self.names[:len(refs)], self.cfg.call_timeout_s,
                         "scoring with the teacher (teacher.call_timeout_s)")
        return torch.cat(parts)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
