"""``fleetrl train``: dispatch on the config's algorithm."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

from fleetrl.run.config import (
    OFFLINE_ALGORITHMS,
    ONLINE_ALGORITHMS,
    PLANNED_ALGORITHMS,
    ConfigError,
    RunConfig,
)


def train(cfg: RunConfig, config_path: str | Path | None = None, check: bool = True) -> Path | str:
    """Run it; returns the run directory (a Path, or the URI of a remote run.output_dir)."""
    if check:  # the checks of `fleetrl check`, before a run directory exists
        sys.stdout.write(f"fleetrl: inputs checked\n{_check_while_ray_starts(cfg, config_path).summary()}\n")
    if cfg.algorithm in PLANNED_ALGORITHMS:
        raise ConfigError(
            f"algorithm '{cfg.algorithm}' is not built yet in this version of fleetrl; "
            f"available now: {', '.join(ONLINE_ALGORITHMS + OFFLINE_ALGORITHMS)}"
        )
    from fleetrl.run.runtime import RunDir

    run_dir = RunDir(cfg, config_path)
    try:
        with _log_to(run_dir.path / "train.log"), _graceful_sigterm(run_dir):
            if cfg.algorithm in OFFLINE_ALGORITHMS:
                from fleetrl.offline.loop import run_offline

                return run_offline(cfg, run_dir)
            from fleetrl.online.supervisor import run_supervised

            return run_supervised(cfg, run_dir)
    finally:
        _upload_logs(run_dir)


def _check_while_ray_starts(cfg: RunConfig, config_path: str | Path | None):
    """The checks of `fleetrl check`, while a local Ray starts beside them (seconds of start-up that
    overlap instead of adding up). A failed check stops that Ray again. Joining a cluster, the
    checks connect themselves (they compare the cluster's resources), so nothing runs beside them."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from fleetrl.run.check import check_run

    if cfg.ray.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return check_run(cfg, config_path)
    from fleetrl.run.runtime import connect_ray

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetrl-check") as pool:
        checks = pool.submit(check_run, cfg, config_path)
        try:
            connect_ray(cfg.ray)  # the main thread: Ray installs signal handlers
        except BaseException:
            checks.result()  # a failed check is the more useful message
            raise
        try:
            return checks.result()
        except BaseException:
            ray.shutdown()
            raise


def _upload_logs(run_dir) -> None:
    """A remote run directory gets the driver's last log lines too, also after a failure."""
    try:
        run_dir.sync(force=True)
    except Exception as e:  # never hide the run's own error behind an upload failure
        logging.getLogger("fleetrl").warning("could not upload the logs to %s: %s", run_dir.uri, e)


@contextlib.contextmanager
def _graceful_sigterm(run_dir):
    """SIGTERM to the driver = a graceful stop: the loop finishes its step, checkpoints and exits 0.
    A second SIGTERM ends the process at once. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        if run_dir.stop_signal:
            raise SystemExit(128 + signum)
        run_dir.stop_signal = True
        logging.getLogger("fleetrl").warning(
            "SIGTERM: stopping after this step with a checkpoint (send it again to end now)")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Tee:
    """Console output that also lands in the run directory's train.log."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _log_to(path: Path):
    with open(path, "a", buffering=1) as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        handler = logging.StreamHandler(sys.stderr)  # log records: console and train.log
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("fleetrl")
        logger.addHandler(handler)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
            logger.removeHandler(handler)
