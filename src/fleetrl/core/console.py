"""What `fleetrl train` shows on the console: fleetrl's lines and real warnings/errors.

Two layers. The services (rollout workers, learner ranks) start with the libraries' own switches
for noise known to be harmless here (:func:`quiet_env`: vLLM's log level, Hugging Face / tqdm
progress bars, torch's C++ warnings, the FutureWarning vLLM's triton dispatcher triggers). What is
left passes :class:`ConsoleFilter` on its way to the console: every line still reaches train.log,
the console gets fleetrl's own lines, warnings, errors and tracebacks (:func:`show_on_console`).
``run.verbose: true`` / ``fleetrl train --verbose`` turns both off.
"""

from __future__ import annotations

import os
import re

VERBOSE_ENV_VAR = "FLEETRL_VERBOSE"  # set by the driver for `--verbose`; read where service envs are built

# The libraries' own switches, set in each service's environment before the library is imported
# (a value in rollout.env_vars or the driver's environment wins).
QUIET_ENV: dict[str, str] = {
    "VLLM_LOGGING_LEVEL": "ERROR",  # vLLM's start-up WARNINGs (enforce-eager, libtcmalloc, Triton, ...)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub and transformers bars ("Loading weights", "Writing model shards")
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",  # any other tqdm bar (vLLM's "Loading safetensors checkpoint shards")
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # c10 warnings such as "NUMA binding: Using MEMBIND policy"
    # vllm/triton_utils/dispatcher.py touches the deprecated torch.distributed.reduce_op.
    "PYTHONWARNINGS": "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
}

# Lines known to be harmless here (whatever their level), as the libraries print them.
NOISE = tuple(re.compile(p) for p in (
    r"doesn't include CPU backend",  # vLLM: Triton without triton-cpu
    r"triton_utils/dispatcher\.py:\d+: FutureWarning",
    r"torch\.distributed\.reduce_op` is deprecated",
    r"NUMA binding: Using MEMBIND",
    r"Loading safetensors checkpoint shards",
    r"^(Loading weights|Writing model shards|Loading checkpoint shards)\b",
    r"\d+%\|[^|]*\|",  # a tqdm bar
    r"Token authentication is enabled for this Ray cluster",  # a local Ray makes its own token
    r"Started a local Ray instance",  # fleetrl prints the dashboard URL itself
    r"lib(tcmalloc|iomp) is not found in LD_PRELOAD",
    r"Enforce eager set, disabling torch\.compile",
    r"Inductor compilation was disabled",
    r"Triton is not installed|requires Triton",
    r"Reset SSM cache type",
    r"The global random seed is set to",
    r"Passing raw prompts to InputProcessor is deprecated",
    r": Failed to load weights$",  # vLLM's layerwise reload: modules without weights (rotary, ...)
))

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?P<source>[^()]*pid=\d+[^()]*)\)\s?")  # "(RolloutWorker pid=123) "
_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_FLEETRL = re.compile(r"^fleetrl\b|^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) fleetrl[.:]")
_SERIOUS = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b|Traceback|\w(Error|Exception|Warning)\b|"
                      r"\bWarning:|\berror:|\bfailed\b|\bdied\b|\bkilled\b|out of memory", re.IGNORECASE)


def split_line(line: str) -> tuple[str | None, str]:
    """(Ray's source prefix or None, the message) with colours and the log-dedup marker removed."""
    text = _ANSI.sub("", line).rstrip("\r\n")
    m = _RAY_PREFIX.match(text)
    source = m.group("source") if m else None
    if m:
        text = text[m.end():]
    return source, _DEDUP.sub("", text).split("\r")[-1]


def show_on_console(line: str) -> bool:
    """The console's rule for one line: fleetrl's own lines, warnings and errors yes; known
    harmless noise, progress bars and the libraries' other chatter no (they stay in train.log)."""
    source, text = split_line(line)
    if _FLEETRL.search(text.strip()):
        return True
    if not text.strip():
        return source is None  # a worker's empty line (after a progress bar) no; the driver's own yes
    if any(p.search(text) for p in NOISE):
        return False
    return bool(_SERIOUS.search(text))


class ConsoleFilter:
    """:func:`show_on_console` plus tracebacks: after a "Traceback" line, the lines of the same
    source are shown up to the exception line (the first one that is not indented)."""

    def __init__(self):
        self._in_traceback: set[str | None] = set()

    def show(self, line: str) -> bool:
        source, text = split_line(line)
        if source in self._in_traceback:
            if not text.startswith(" "):
                self._in_traceback.discard(source)
            return True
        if text.startswith("Traceback (most recent call last)"):
            self._in_traceback.add(source)
            return True
        return show_on_console(line)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_env() -> dict[str, str]:
    """The switches for a service's environment; none with --verbose, none the driver's env already sets."""
    if verbose():
        return {}
    return {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
