"""Run directories, Ray connection and the choices every trainer makes the same way."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from fleetrl.run.config import RayConfig, RunConfig, dump_config, redacted_config


class RunDir:
    """``run.output_dir/run.name``: config.yaml, metrics.jsonl, checkpoints/, final_model/."""

    def __init__(self, cfg: RunConfig, config_path: str | Path | None = None):
        name = cfg.run.name or f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.path = Path(cfg.run.output_dir) / name
        self.config_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
        from fleetrl.run.check import holds_run

        # A start that failed before step 1 left only config.yaml/train.log: reuse it, no resume needed.
        if not cfg.run.resume and holds_run(self.path):
            raise FileExistsError(
                f"run directory {self.path} already holds a run; set run.resume=true to continue it, "
                f"or choose another run.name"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        # Secrets redacted; a resume reads the user's file + overrides, never this copy.
        (self.path / "config.yaml").write_text(dump_config(cfg))
        # Actor names are global in a Ray namespace: prefix them so two runs can share a cluster.
        self.actor_prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", name) + "/"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def truncate_logs(self, step: int) -> None:
        """On resume: drop log rows of steps after the checkpoint, which the run will redo."""
        import json

        for path in (self.metrics_path, self.path / "samples.jsonl"):
            if path.exists():
                keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in keep))

    def metrics_writer(self, cfg: RunConfig, append: bool):
        from fleetrl.metrics.local import MetricsWriter

        wandb = None if cfg.run.wandb is None else {"name": self.path.name, **cfg.run.wandb,
                                                     "config": redacted_config(cfg)}
        return MetricsWriter(self.metrics_path, append=append,
                             tensorboard_dir=self.path / "tensorboard" if cfg.run.tensorboard else None,
                             wandb=wandb)

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        root = self.path / "checkpoints"
        done = sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists()) if root.exists() else []
        return done[-1] if done else None


def connect_ray(cfg: RayConfig) -> None:
    """Join ``ray.address`` (or RAY_ADDRESS) when set; else start a local Ray that listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _allow_cluster_addresses()
        ray.init(address=address, namespace=cfg.namespace)
        return
    keep_ray_on_loopback()
    ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=False)


def keep_ray_on_loopback() -> None:
    """Make the next local ``ray.init()`` / ``ray start --head`` of this process use 127.0.0.1.

    fleetrl/__init__.py sets the variable before ray is imported; if something imported ray first
    (a user's script), Ray's copy of it is corrected here too. A value the user exported wins."""
    import fleetrl

    os.environ.setdefault(fleetrl.LOOPBACK_ENV_VAR, "0")
    if os.environ[fleetrl.LOOPBACK_ENV_VAR].strip().lower() in ("0", "false"):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def _allow_cluster_addresses() -> None:
    """Joining a cluster: take back the loopback setting fleetrl/__init__.py made (not the user's)."""
    import fleetrl

    if not fleetrl._loopback_set_here:
        return
    os.environ.pop(fleetrl.LOOPBACK_ENV_VAR, None)
    fleetrl._loopback_set_here = False
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = not ray_constants.IS_WINDOWS_OR_OSX


def pick_backend(backend: str) -> str:
    """gloo on CPU, nccl on GPU, unless the config names one."""
    if backend != "auto":
        return backend
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_model(path: str) -> str:
    from fleetrl.testing.tiny import resolve_model_path

    return str(resolve_model_path(path))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
