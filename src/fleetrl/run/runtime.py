"""Run directories, Ray connection and the choices every trainer makes the same way."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from fleetrl.core import storage
from fleetrl.core.storage import Storage, StorageError, is_remote, scratch_root
from fleetrl.run.config import RayConfig, RunConfig, dump_config, redacted_config, with_absolute_file_specs


class RunDir:
    """``run.output_dir/run.name``: config.yaml, metrics.jsonl, samples.jsonl, train.log, checkpoints/,
    final_model/. ``uri`` is where they live (a local/shared path or an s3:// URI); ``path`` is the
    driver's local directory for the files it appends to (the run directory itself when local, a
    mirror under FLEETRL_SCRATCH or the temp dir when remote, uploaded by ``sync``)."""

    STOP_FILE = "STOP"  # `fleetrl stop --graceful RUN_DIR` writes it; the loop ends after its step
    SYNC_EVERY_S = 30.0  # remote run dirs: logs uploaded at most this often (and at checkpoints, the end)
    STOP_POLL_S = 5.0  # remote run dirs: the stop file is looked for at most this often

    def __init__(self, cfg: RunConfig, config_path: str | Path | None = None):
        self.name = name = cfg.run.name or f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.storage = Storage(cfg.run.storage_options)
        root = cfg.run.output_dir if is_remote(cfg.run.output_dir) else os.path.abspath(cfg.run.output_dir)
        self.uri = self.storage.join(root, name)
        self.remote = is_remote(self.uri)
        self.keep_last = cfg.run.keep_last
        self.config_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
        from fleetrl.run.check import RUN_FILES

        try:
            # A start that failed before step 1 left only config.yaml/train.log: reuse it, no resume needed.
            existing = [n for n in self.storage.listdir(self.uri) if n != self.STOP_FILE and n not in RUN_FILES]
        except Exception as e:  # unreachable store, bad credentials, no such bucket
            raise StorageError(f"run.output_dir {cfg.run.output_dir}: cannot list {self.uri}: "
                               f"{type(e).__name__}: {e}") from None
        if existing and not cfg.run.resume:
            raise FileExistsError(
                f"run directory {self.uri} already holds a run; set run.resume=true to continue it "
                f"(or: fleetrl train --resume {self.uri}), or choose another run.name"
            )
        if self.remote:
            # In this user's own scratch (never a shared /tmp path another user could have planted).
            self.path = scratch_root() / "fleetrl-runs" / name
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            if cfg.run.resume:  # the logs to continue (truncate_logs trims them to the checkpoint)
                for log_name in ("metrics.jsonl", "samples.jsonl", "train.log"):
                    if log_name in existing:
                        (self.path / log_name).write_text(self.storage.read_text(self.storage.join(self.uri, log_name)))
        else:
            self.path = Path(self.uri)
            self.path.mkdir(parents=True, exist_ok=True)
        # Secrets redacted; a resume by directory reads this copy (secrets come back as overrides).
        # Rule and environment files absolute, so that copy works from any working directory.
        self.storage.write_text(self.storage.join(self.uri, "config.yaml"),
                                dump_config(with_absolute_file_specs(cfg, self.config_dir)))
        # Actor names are global in a Ray namespace: prefix them so two runs can share a cluster.
        self.actor_prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", name) + "/"
        self.stop_signal = False  # set by the driver's SIGTERM handler (train.py)
        self._last_sync = self._last_stop_poll = 0.0

    @property
    def location(self) -> Path | str:
        """What to tell the user: the local run directory, or the URI."""
        return self.uri if self.remote else self.path

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def truncate_logs(self, step: int) -> None:
        """On resume: drop log rows of steps after the checkpoint, which the run will redo (and a
        torn last line left by a kill)."""
        import json

        for path in (self.metrics_path, self.path / "samples.jsonl"):
            if path.exists():
                keep = []
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row["step"] <= step:
                        keep.append(line)
                path.write_text("".join(line + "\n" for line in keep))

    def metrics_writer(self, cfg: RunConfig, append: bool):
        from fleetrl.metrics.local import MetricsWriter

        wandb = None if cfg.run.wandb is None else {"name": self.path.name, **cfg.run.wandb,
                                                     "config": redacted_config(cfg)}
        return MetricsWriter(self.metrics_path, append=append,
                             tensorboard_dir=self.path / "tensorboard" if cfg.run.tensorboard else None,
                             wandb=wandb)

    def sync(self, force: bool = False) -> None:
        """Remote run dir: upload the driver's logs (whole files; at most every SYNC_EVERY_S unless forced)."""
        if not self.remote or (not force and time.monotonic() - self._last_sync < self.SYNC_EVERY_S):
            return
        self._last_sync = time.monotonic()
        for local in sorted(self.path.rglob("*")):
            if local.is_file():
                rel = local.relative_to(self.path).as_posix()
                self.storage.upload_file(str(local), self.storage.join(self.uri, *rel.split("/")))

    # ------------------------------------------------------------------ checkpoints and final models

    @property
    def checkpoints_root(self) -> str:
        return self.storage.join(self.uri, "checkpoints")

    def checkpoint_dir(self, step: int) -> str:
        return self.storage.join(self.checkpoints_root, f"step-{step:06d}")

    def latest_checkpoint(self) -> str | None:
        """The newest COMPLETE checkpoint (a torn or unverified one is never used)."""
        done = storage.complete_checkpoints(self.storage, self.checkpoints_root)
        return done[-1] if done else None

    def begin_output(self, final: str) -> str:
        """Staging location for a checkpoint or model directory ``final`` (leftovers of a crash cleared)."""
        return storage.begin(self.storage, final)

    def finish_output(self, staging: str, final: str, num_ranks: int | dict[str, int], note: str) -> None:
        """Verify every writer committed (``num_ranks``: ranks at the top, or {subdir: ranks}), then
        publish; for checkpoints, delete what ``run.keep_last`` no longer keeps."""
        parts = num_ranks if isinstance(num_ranks, dict) else {"": num_ranks}
        for sub, n in parts.items():
            where = self.storage.join(staging, sub) if sub else staging
            storage.verify_complete(self.storage, where, n, f"{Storage.name(final)}{'/' + sub if sub else ''}")
        storage.publish(self.storage, staging, final, note)
        if Storage.parent(final) == self.checkpoints_root:
            storage.prune(self.storage, self.checkpoints_root, self.keep_last)
        self.sync(force=True)

    # ------------------------------------------------------------------ graceful stop

    def stop_requested(self) -> bool:
        """SIGTERM to the driver, or a STOP file in the run directory (`fleetrl stop --graceful`)."""
        if self.stop_signal:
            return True
        if self.remote and time.monotonic() - self._last_stop_poll < self.STOP_POLL_S:
            return False
        self._last_stop_poll = time.monotonic()
        return self.storage.exists(self.storage.join(self.uri, self.STOP_FILE))

    def clear_stop(self) -> None:
        """The stop was honoured: remove the request (so a resumed run does not stop at once)."""
        self.storage.remove(self.storage.join(self.uri, self.STOP_FILE))


def request_graceful_stop(run_dir: str, storage_options: dict | None = None) -> str:
    """Write the STOP file into an existing run directory (local path or URI); returns its location."""
    store = Storage(storage_options)
    if not is_remote(run_dir):
        run_dir = os.path.abspath(run_dir)
    if not store.exists(store.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"{run_dir} is not a fleetrl run directory (no config.yaml); give the "
                                "directory the run writes, output_dir/name")
    where = store.join(run_dir, RunDir.STOP_FILE)
    store.write_text(where, f"stop requested at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return where


def resume_config(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config of the run in ``run_dir`` (its saved config.yaml) with ``overrides`` on top, set to
    continue that run. Redacted secrets must come back as overrides; ``run.storage_options.*``
    overrides also serve to read the directory itself."""
    import yaml

    from fleetrl.run.config import ConfigError, config_from_dict, parse_override

    options: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[:2] == ["run", "storage_options"] and len(keys) == 3:
            options[keys[2]] = value
    store = Storage(options)
    run_dir = run_dir.rstrip("/") if is_remote(run_dir) else os.path.abspath(run_dir)
    saved = store.join(run_dir, "config.yaml")
    try:
        text = store.read_text(saved)
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; give the run directory (output_dir/name) "
                          "of an earlier fleetrl train") from None
    except Exception as e:  # unreachable store, missing credentials
        raise ConfigError(f"--resume {run_dir}: cannot read {saved}: {type(e).__name__}: {e}; credentials and "
                          "endpoint come from the AWS environment variables or run.storage_options.* "
                          "overrides") from None
    tree = yaml.safe_load(text) or {}
    run = tree.setdefault("run", {})
    run.update(output_dir=Storage.parent(run_dir), name=Storage.name(run_dir), resume=True)
    return config_from_dict(tree, overrides, source=saved)


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
    dashboard = dashboard_available() if cfg.dashboard is None else cfg.dashboard
    extra = {"dashboard_host": "127.0.0.1", "dashboard_port": cfg.dashboard_port} if dashboard else {}
    from fleetrl.core.console import verbose

    if not verbose():  # Ray's INFO start-up lines (fleetrl prints the dashboard URL itself)
        import logging

        extra["logging_level"] = logging.WARNING
        # "Token authentication is enabled for this Ray cluster": this Ray is the run's own (its
        # "disabled" warning stays). Before any console filter exists: the checks start this Ray.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _token_auth_enabled_notice)
    ray.init(num_cpus=cfg.num_cpus, namespace=cfg.namespace, include_dashboard=dashboard, **extra)


def _token_auth_enabled_notice(record) -> bool:
    """A logging filter: False (drop) for Ray's notice that a local Ray turned token auth on."""
    return not record.getMessage().startswith("Token authentication is enabled")


def dashboard_available() -> bool:
    """Ray's dashboard dependencies (ray[default]: aiohttp and friends) import here."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def watch_urls() -> list[tuple[str, str]]:
    """Where to watch the connected Ray: [("dashboard", url), ("metrics", url)] as far as they exist.
    The Prometheus endpoint is this node's metrics export port (a local Ray: 127.0.0.1)."""
    import ray

    out: list[tuple[str, str]] = []
    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    if node is None:
        return out
    url = node.webui_url
    if url:
        out.append(("dashboard", url if "://" in url else f"http://{url}"))
    if node.metrics_export_port:
        out.append(("metrics", f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"))
    return out


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


def builtin_model_names() -> tuple[str, ...]:
    """The `model.path` names fleetrl builds itself: the tiny models and the real SmolLM2."""
    from fleetrl.testing.pretrained import PRETRAINED_NAMES
    from fleetrl.testing.tiny import TINY_NAMES

    return (*TINY_NAMES, *PRETRAINED_NAMES)


def resolve_model(path: str) -> str:
    """A model directory for `path`: the built-in names are built (once, cached); others unchanged."""
    from fleetrl.testing.pretrained import PRETRAINED_NAMES, ensure_smollm2
    from fleetrl.testing.tiny import resolve_model_path

    if path in PRETRAINED_NAMES:
        return str(ensure_smollm2())
    return str(resolve_model_path(path))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
