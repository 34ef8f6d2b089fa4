"""The console filter (core/console.py): lines as a `fleetrl train` of examples/grpo_tiny.yaml printed
them (Ray 2.60, vLLM CPU, DeepSpeed), the libraries' switches, and the tee into train.log."""

import io

import pytest

from fleetrl.core import console
from fleetrl.core.console import ConsoleFilter, quiet_env, show_on_console, split_line

W = "\x1b[36m(RolloutWorker pid=13443)\x1b[0m "
L = "\x1b[36m(Learner pid=13512)\x1b[0m "
NOISE = [
    W + "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    W + "Triton is installed, but doesn't include CPU backend. Disabling Triton.\x1b[32m [repeated 2x across "
    "cluster] (Ray deduplicates logs by default. Set RAY_DEDUP_LOGS=0 to disable log deduplication, or see "
    "https://docs.ray.io/en/master/ray-observability/user-guides/configure-logging.html#log-deduplication "
    "for more options.)\x1b[0m",
    W + "/work/.venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: "
    "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
    W + '  if hasattr(value, "__dict__"):',
    W + "[W1207 08:00:41.967395488 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory "
    "allocation on the NUMA nodes (0). Memory allocations will be strictly bound to these NUMA nodes. "
    "(function init_cpu_memory_env)",
    W + "Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]",
    W + "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 495.25it/s]",
    W,  # the empty line after a bar
    L + "Loading weights:   0%|          | 0/26 [00:00<?, ?it/s]Loading weights: 100%|██████████| 26/26 "
    "[00:00<00:00, 37384.95it/s]",
    L + "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]Writing model shards: 100%|██████████| "
    "1/1 [00:00<00:00, 117.82it/s]",
    W + "(EngineCore pid=13648) WARNING 12-07 08:00:41 [cpu_worker.py:114] libtcmalloc is not found in "
    "LD_PRELOAD. For best performance, please follow the section `set LD_PRELOAD` in https://docs.vllm.ai/",
    W + "(MainProcess pid=13443) WARNING 12-07 08:00:36 [vllm.py:1703] Enforce eager set, disabling "
    "torch.compile, CUDAGraphs, and JIT kernel warmup.",
    W + "(EngineCore pid=13648) WARNING 12-07 08:00:55 [layerwise.py:266] RotaryEmbedding: Failed to load "
    "weights\x1b[32m [repeated 3x across cluster]\x1b[0m",
    W + "(MainProcess pid=13443) INFO 12-07 08:00:36 [model.py:530] Resolved architecture: Qwen2ForCausalLM",
    "2026-12-07 08:00:22,071\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled "
    "for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-12-07 08:00:26,298\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m",
]
SHOWN = [
    "fleetrl: dashboard: http://127.0.0.1:8265",
    "fleetrl: step 2/2 | reward 0.09096 | loss -0.01819 | kl 0 | len 22.77 | step_s 0.3434 | eta 0m00s",
    "2026-12-07 08:01:02,001 WARNING fleetrl.online.loop: SIGTERM: stopping after this step",
    W + "fleetrl: rollout worker 0 drained",
    W + "(EngineCore pid=13648) ERROR 12-07 08:01:00 [core.py:900] EngineCore encountered a fatal error.",
    W + "(MainProcess pid=13443) WARNING 12-07 08:00:50 [scheduler.py:1] Sequence group 3 is preempted",
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.",
    W + "/x/y.py:3: UserWarning: the reward column is empty",
    "",  # the driver's own blank line
]


@pytest.mark.parametrize("line", NOISE)
def test_known_noise_stays_off_the_console(line):
    assert not show_on_console(line), split_line(line)


@pytest.mark.parametrize("line", SHOWN)
def test_fleetrl_lines_and_real_warnings_are_shown(line):
    assert show_on_console(line), split_line(line)


def test_split_line_removes_colours_prefix_and_dedup_marker():
    assert split_line(NOISE[1]) == ("RolloutWorker pid=13443",
                                    "Triton is installed, but doesn't include CPU backend. Disabling Triton.")


def test_a_worker_traceback_is_shown_whole():
    f = ConsoleFilter()
    lines = [W + "Traceback (most recent call last):", W + '  File "/x/worker.py", line 3, in generate',
             W + "    out = self.engine.generate(p)", W + "ValueError: prompt too long", W + "INFO chatter"]
    assert [f.show(line) for line in lines] == [True, True, True, True, False]


def test_quiet_env_uses_the_libraries_switches_and_verbose_turns_them_off(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV_VAR, raising=False)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    env = quiet_env()
    assert env["VLLM_LOGGING_LEVEL"] == "ERROR" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert env["TQDM_DISABLE"] == "1" and "reduce_op" in env["PYTHONWARNINGS"]
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own value wins
    assert "VLLM_LOGGING_LEVEL" not in quiet_env()
    monkeypatch.setenv(console.VERBOSE_ENV_VAR, "1")
    assert quiet_env() == {}


def test_the_pythonwarnings_value_parses():
    import subprocess
    import sys

    probe = ("import warnings; warnings.warn('`torch.distributed.reduce_op` is deprecated, please use "
             "`torch.distributed.ReduceOp` instead', FutureWarning); print('ok')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={"PYTHONWARNINGS": console.QUIET_ENV["PYTHONWARNINGS"]})
    assert out.stdout.strip() == "ok" and out.stderr == "", out.stderr


def test_the_tee_writes_everything_to_train_log_and_filters_the_console(tmp_path):
    import sys

    from fleetrl.train import _log_to

    shown = io.StringIO()
    real = sys.stdout
    sys.stdout = shown
    try:
        with _log_to(tmp_path / "train.log", verbose=False):
            for line in NOISE + SHOWN[:2]:
                print(line)
            sys.stdout.write("fleetrl: partial")
    finally:
        sys.stdout = real
    log = (tmp_path / "train.log").read_text()
    assert all(line in log for line in NOISE + SHOWN[:2])
    assert shown.getvalue() == SHOWN[0] + "\n" + SHOWN[1] + "\nfleetrl: partial"


def test_a_local_rays_token_notice_is_dropped_and_the_disabled_warning_kept():
    """connect_ray filters Ray's "enabled" notice (the run's own Ray made the token); "disabled" is a real warning."""
    import logging

    from fleetrl.run.runtime import _token_auth_enabled_notice

    def record(msg):
        return logging.LogRecord("ray._private.authentication.authentication_token_setup", logging.WARNING,
                                 __file__, 1, msg, None, None)

    assert not _token_auth_enabled_notice(record("Token authentication is enabled for this Ray cluster. Set "
                                                 "RAY_AUTH_MODE=disabled to opt out."))
    assert _token_auth_enabled_notice(record("Token authentication is disabled for this Ray cluster. Anyone with "
                                             "network access to the cluster can run arbitrary code"))
