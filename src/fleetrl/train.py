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
    import os

    from fleetrl.core import console

    if cfg.run.verbose:  # the services' environments keep the libraries' own output (core/console.py)
        os.environ[console.VERBOSE_ENV_VAR] = "1"
    verbose = console.verbose()  # run.verbose, `fleetrl train --verbose` or FLEETRL_VERBOSE=1
    import ray

    owns_ray = not ray.is_initialized()  # this call connects (a local Ray: starts it), so it disconnects
    if check:  # the checks of `fleetrl check`, before a run directory exists
        sys.stdout.write(f"fleetrl: inputs checked\n{_check_while_ray_starts(cfg, config_path).summary()}\n")
    if cfg.algorithm in PLANNED_ALGORITHMS:
        raise ConfigError(
            f"algorithm '{cfg.algorithm}' is not built yet in this version of fleetrl; "
            f"available now: {', '.join(ONLINE_ALGORITHMS + OFFLINE_ALGORITHMS)}"
        )
    from fleetrl.run.runtime import RunDir, connect_ray, watch_urls

    run_dir = RunDir(cfg, config_path)
    try:
        with _log_to(run_dir.path / "train.log", verbose=verbose), _graceful_sigterm(run_dir):
            try:
                connect_ray(cfg.ray)  # (already connected after the checks)
                for what, url in watch_urls():  # where to watch: the Ray dashboard, the Prometheus endpoint
                    sys.stdout.write(f"fleetrl: {what}: {url}\n")
                if cfg.algorithm in OFFLINE_ALGORITHMS:
                    from fleetrl.offline.loop import run_offline

                    return run_offline(cfg, run_dir)
                from fleetrl.online.supervisor import run_supervised

                return run_supervised(cfg, run_dir)
            finally:
                if owns_ray:  # Ray's last worker lines (flushed at shutdown) pass the console filter too
                    import ray

                    ray.shutdown()
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
    """Console output that also lands in the run directory's train.log. With a ``console`` filter
    (core/console.py), all of it goes to the file and the console gets the lines the filter shows."""

    def __init__(self, stream, file, console=None):
        self.stream, self.file, self.console = stream, file, console
        self._partial = ""

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.console is None:
            return self.stream.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        shown = "".join(line + "\n" for line in lines if self.console.show(line))
        if shown:
            self.stream.write(shown)
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def close_line(self) -> None:
        """The last unfinished line, if any, through the filter."""
        if self._partial and self.console is not None and self.console.show(self._partial):
            self.stream.write(self._partial)
        self._partial = ""

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _log_to(path: Path, verbose: bool = True):
    from fleetrl.core.console import ConsoleFilter

    with open(path, "a", buffering=1) as f:
        out, err = sys.stdout, sys.stderr
        console = None if verbose else ConsoleFilter()  # one filter: a traceback may span both streams
        sys.stdout, sys.stderr = _Tee(out, f, console), _Tee(err, f, console)
        handler = logging.StreamHandler(sys.stderr)  # log records: console and train.log
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("fleetrl")
        logger.addHandler(handler)
        try:
            yield
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee):
                    tee.close_line()
            sys.stdout, sys.stderr = out, err
            logger.removeHandler(handler)
