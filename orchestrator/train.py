"""``fleetrl train``: dispatch on the config's algorithm."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import (
    OFFLINE_ALGORITHMS,
    ONLINE_ALGORITHMS,
    PLANNED_ALGORITHMS,
    ConfigError,
    RunConfig,
)


def train(cfg: RunConfig, config_path: str | Path | None = None) -> Path:
    if cfg.algorithm in PLANNED_ALGORITHMS:
        raise ConfigError(
            f"algorithm '{cfg.algorithm}' is not built yet in this version of fleetrl; "
            f"available now: {', '.join(ONLINE_ALGORITHMS + OFFLINE_ALGORITHMS)}"
        )
    from orchestrator.runtime import RunDir

    if cfg.algorithm in OFFLINE_ALGORITHMS:
        from orchestrator.offline import run_offline

        return run_offline(cfg, RunDir(cfg, config_path))
    from orchestrator.online import run_online

    return run_online(cfg, RunDir(cfg, config_path))
