"""The restart supervisor of an online run: a fault the step loop cannot absorb (a dead learner rank,
a weight sync that timed out, a fleet that cannot be rebuilt) ends the services, and the run starts
them again from the last complete checkpoint, up to ``run.max_restarts`` times.

Faults the loop absorbs itself do not come here: a dead or hung rollout worker (its prompts go
elsewhere, it is replaced), a worker lost during a broadcast (dropped, the sync completes for the
others), a dead reward actor (restarted, its groups rescored). Errors that a restart cannot fix
(bad config or data, a reward function that raises under ``reward.on_error: fail``) end the run at
once. The count is ``run/restarts`` in every metrics row after a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fleetrl.data.rows import DataError
from fleetrl.env.runner import EnvError
from fleetrl.reward.scorer import RewardError
from fleetrl.run.config import ConfigError, RunConfig
from fleetrl.run.runtime import RunDir

log = logging.getLogger("fleetrl")

# The same input gives the same error again: restarting would only repeat it. EnvError: an
# environment that raised under rollout.episode.on_error: fail meets the same rows (and policy) again.
NOT_RESTARTABLE: tuple[type[BaseException], ...] = (ConfigError, DataError, RewardError, EnvError, FileExistsError)


def is_restartable(error: BaseException) -> bool:
    # A RayTaskError is also an instance of the error it wraps, so a user error raised inside an
    # actor is recognised here too.
    return isinstance(error, Exception) and not isinstance(error, NOT_RESTARTABLE)


def run_supervised(cfg: RunConfig, run_dir: RunDir, run: Callable[..., Path] | None = None) -> Path:
    """``run(cfg, run_dir, restarts=n)`` (default: ``run_online``), started again with
    ``run.resume=true`` after each restartable fault, at most ``run.max_restarts`` times."""
    if run is None:
        from fleetrl.online.loop import run_online as run
    restarts = 0
    while True:
        try:
            return run(cfg, run_dir, restarts=restarts)
        except Exception as e:
            if not is_restartable(e) or restarts >= cfg.run.max_restarts:
                if is_restartable(e) and cfg.run.max_restarts:
                    log.error("run failed again after %d restart(s) (run.max_restarts=%d): %s: %s",
                              restarts, cfg.run.max_restarts, type(e).__name__, e)
                raise
            restarts += 1
            ckpt = run_dir.latest_checkpoint()
            log.error("run failed (%s: %s); restart %d/%d of the services from %s", type(e).__name__,
                      _first_line(e), restarts, cfg.run.max_restarts,
                      ckpt if ckpt is not None else "the start (no complete checkpoint yet)")
            if not cfg.run.resume:
                cfg = cfg.model_copy(deep=True)
                cfg.run.name = run_dir.name  # resume needs the name (a generated one, if none was given)
                cfg.run.resume = True
            _wait_names_free(run_dir.actor_prefix)


def _wait_names_free(prefix: str, timeout_s: float = 60.0) -> None:
    """The killed services' actor names are freed asynchronously: wait for them before the restart
    creates actors under the same names."""
    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    while left := [n for n in ray.util.list_named_actors() if n.startswith(prefix)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"restarting the run: actors {left} were still alive {timeout_s:.0f}s after "
                               "the services were shut down; stop them (ray.kill) and resume with run.resume=true")
        time.sleep(0.2)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else ""
