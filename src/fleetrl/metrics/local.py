"""metrics.jsonl (one JSON object per step, always with ``step``) and the console progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsWriter:
    """Each step's metrics to metrics.jsonl, and optionally TensorBoard and Weights & Biases.

    ``wandb``: keyword arguments of ``wandb.init`` (their ``config`` already redacted by the caller, see
    fleetrl.run.config.redacted_config), plus an optional ``api_key`` passed in the run's settings."""

    def __init__(self, path: Path, append: bool = False, tensorboard_dir: Path | None = None,
                 wandb: dict | None = None):
        self._f = open(path, "a" if append else "w", buffering=1)
        self._tb = None
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))
        self._wandb = None
        if wandb is not None:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise RuntimeError(
                    "run.wandb is set but the wandb package is not installed: pip install 'fleetrl[wandb]' "
                    "(or remove run.wandb)"
                ) from None
            kwargs = dict(wandb)
            api_key = kwargs.pop("api_key", None)  # not a wandb.init argument: it goes in its settings
            if api_key:
                settings = kwargs.get("settings") or {}
                if isinstance(settings, dict):
                    settings = wandb_lib.Settings(**settings)
                settings.api_key = api_key
                kwargs["settings"] = settings
            self._wandb = wandb_lib.init(**kwargs)

    def write(self, row: dict) -> None:
        if "step" not in row:
            raise ValueError("every metrics row needs a 'step'")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")
        numbers = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numbers.items():
                if k != "step":
                    self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """One line per step: step/total, reward, loss, step time, ETA."""

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total = total
        self.start_step = start
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout  # looked up now: train() redirects stdout to train.log

    def update(self, step: int, row: dict) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"]
        for key, label in (("reward/mean", "reward"), ("train/policy_loss", "loss"), ("train/kl", "kl"),
                           ("response_length/mean", "len"), ("time/step", "step_s")):
            if isinstance(row.get(key), (int, float)):
                parts.append(f"{label} {row[key]:.4g}")
        parts.append(f"eta {_fmt_s(eta)}")
        print("fleetrl: " + " | ".join(parts), file=self.stream, flush=True)


class Ticker:
    """Progress of one long phase (reference precompute, evaluation) as console lines
    ``fleetrl: <what>: done/total <unit> (Ns)``: at each tenth of the way, or after ``every_s``
    seconds of silence, and at the end; a phase that ends within ``quiet_s`` prints only its last
    line. ``last_line=False``: no line at the end (the caller prints its own summary)."""

    def __init__(self, what: str, total: int, unit: str = "sequences", every_s: float = 30.0,
                 quiet_s: float = 2.0, stream=None, clock=time.perf_counter, last_line: bool = True):
        self.what, self.total, self.unit = what, max(int(total), 0), unit
        self.every_s, self.quiet_s, self.clock = every_s, quiet_s, clock
        self.stream = stream or sys.stdout
        self.last_line = last_line
        self.done = 0
        self.t0 = self.last = clock()
        self._next_tenth = 1

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        tenth = self.done * 10 // max(self.total, 1)
        if self.done >= self.total:
            if self.last_line:
                self._say(now)
        elif now - self.t0 >= self.quiet_s and (tenth >= self._next_tenth or now - self.last >= self.every_s):
            self._say(now)
        self._next_tenth = max(self._next_tenth, tenth + 1)

    def _say(self, now: float) -> None:
        self.last = now
        print(f"fleetrl: {self.what}: {self.done}/{self.total} {self.unit} ({now - self.t0:.1f}s)",
              file=self.stream, flush=True)


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
