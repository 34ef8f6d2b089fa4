"""Ray jobs on a real local head: submit through fleetrl.deploy.jobs, see the job succeed, read its logs
and the fleetrl metrics it exported from the head's Prometheus endpoint; status, logs, jobs and
stop through the CLI. The head is started with token authentication, on loopback, with its own
ports and temp dir, and only its own processes are ended afterwards (never `ray stop`, which
would end every Ray on the machine)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fleetrl.deploy import jobs
from fleetrl.metrics.ray_metrics import COUNTED, metric_name

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RUN = f"e2e-submit-{secrets.token_hex(3)}"  # the `run` tag of the exported metrics
EXAMPLE = REPO / "examples/grpo_tiny.yaml"

# The job under test: a real tiny GRPO run (2 steps, 1 rollout worker), submitted like a user would.
JOB = {"config_path": str(EXAMPLE), "overrides": ["run.steps=2", f"run.name={RUN}", "rollout.num_workers=1"]}
JOB_TIMEOUT_S = 600
# The commands `fleetrl status/logs/stop/jobs`.
CLI = [sys.executable, "-m", "fleetrl.cli"]


def prometheus_name(key: str) -> str:
    return "ray_" + metric_name(key) + ("_total" if key in COUNTED else "")


def expected_metrics(job: dict) -> dict[str, float | None]:
    """Metric -> value the job must leave on Prometheus (None: any value)."""
    pairs = [a.split("=", 1) for a in job.get("command", []) if "=" in a]
    if pairs:
        return {prometheus_name(k): float(v) for k, v in pairs} | {"ray_fleetrl_steps_total": 1.0}
    keys = ("reward/mean", "tokens_per_s", "time/step", "time/generate", "time/train", "weight_version")
    return {prometheus_name(k): None for k in keys} | {"ray_fleetrl_steps_total": None}


# ---------------------------------------------------------------------------------------------
# A private Ray head


@dataclass
class Head:
    url: str  # dashboard (Jobs API)
    metrics_url: str  # Prometheus endpoint of the node
    token: str
    token_path: Path
    log: Path


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def _stop_tree(root: subprocess.Popen, marker: str) -> list[str]:
    """SIGTERM the `ray start --block` process (it ends its node's processes), then SIGKILL by pid
    whatever of its process tree, or of processes naming our temp dir, is left. Returns what
    had to be killed."""
    import psutil

    try:
        tree = [psutil.Process(root.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if root.poll() is None:
        root.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=40)
    strays = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
            strays.append(p)
    killed = []
    for p in {p.pid: p for p in alive + strays}.values():
        try:
            killed.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive + strays, timeout=10)
    root.wait(timeout=10)
    return killed


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="frl-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    token_path = tmp / "auth_token"
    token_path.write_text(token)
    gcs, dash, metrics, client, agent, agent_grpc, runtime_env = _free_ports(7)
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # loopback (ENVIRONMENT.md)
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),  # never touches ~/.ray/auth_token
        PATH=bindir + os.pathsep + env.get("PATH", ""),  # the job's `python`/`fleetrl` are this venv's
        RAY_USAGE_STATS_ENABLED="0",
    )
    log = tmp / "head.log"
    cmd = [
        str(Path(bindir) / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats",
    ]
    t0 = time.perf_counter()
    with open(log, "w") as log_f:
        proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", token, token_path, log)
    try:
        deadline = time.monotonic() + 120
        while _http_get(h.url + "/api/version", token)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up; its log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        print(f"\n[timing] ray head up in {time.perf_counter() - t0:.1f} s")
        yield h
    finally:
        t1 = time.perf_counter()
        killed = _stop_tree(proc, str(tmp))
        print(f"\n[timing] ray head stopped in {time.perf_counter() - t1:.1f} s")
        shutil.rmtree(tmp, ignore_errors=True)
        import psutil

        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if str(tmp) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"Ray processes left behind: {left}"
        if killed:
            print(f"[teardown] needed SIGKILL: {killed}")


def _cli(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A CLI command that finds the cluster the way a user's shell does: RAY_ADDRESS + token env."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_ADDRESS=head.url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_path))
    return subprocess.run([*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _scrape(url: str, run: str) -> dict[str, float]:
    status, text = _http_get(url)
    found = {}
    for line in text.splitlines() if status == 200 else ():
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\}\s+(\S+)$", line)
        if m and f'run="{run}"' in m.group(2):
            found[m.group(1)] = float(m.group(3))
    return found


# ---------------------------------------------------------------------------------------------


def test_submitted_job_succeeds_and_its_metrics_reach_prometheus(head):
    t0 = time.perf_counter()
    job_id = jobs.submit(**JOB, address=head.url, working_dir=REPO, token=head.token)
    t_submit = time.perf_counter() - t0
    expected = expected_metrics(JOB)

    # Gauges of a finished driver stay on the endpoint only ~15 s: scrape while the job runs, and
    # for a while after it ended (metrics reach the endpoint up to ~10 s after being set).
    seen: dict[str, float] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    ended_at = None
    state = None
    while time.monotonic() < deadline:
        seen |= _scrape(head.metrics_url, RUN)
        if ended_at is None:
            state = jobs.status(job_id, address=head.url, token=head.token)
            ended_at = time.monotonic() if state.done else None
        if ended_at is not None and (state.status != "SUCCEEDED" or expected.keys() <= seen.keys()
                                     or time.monotonic() - ended_at > 30):
            break
        time.sleep(0.5)
    t_total = time.perf_counter() - t0
    log_text = jobs.logs(job_id, address=head.url, token=head.token)
    print(f"\n[timing] submit call {t_submit:.1f} s; job done and metrics read {t_total:.1f} s after submit")

    assert state is not None and state.status == "SUCCEEDED", f"job {state}; its logs:\n{log_text[-3000:]}"
    assert RUN in log_text, log_text[-3000:]
    missing = sorted(expected.keys() - seen.keys())
    assert not missing, f"not on {head.metrics_url} with run={RUN}: {missing}; seen {sorted(seen)}"
    for name, value in expected.items():
        if value is not None:
            assert seen[name] == pytest.approx(value), name

    # The same job through the CLI, finding the cluster and token from the environment.
    r = _cli(head, "status", job_id)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout + r.stderr
    r = _cli(head, "logs", job_id)
    assert r.returncode == 0 and RUN in r.stdout, r.stdout + r.stderr
    r = _cli(head, "jobs")
    assert r.returncode == 0 and job_id in r.stdout, r.stdout + r.stderr
    r = _cli(head, "logs", job_id, "--follow")  # an ended job: the whole log, then the stream closes
    assert r.returncode == 0 and RUN in r.stdout, r.stdout + r.stderr


def test_cli_submit_wait_streams_a_failing_training_job_and_exits_1(head, tmp_path):
    """`fleetrl submit --wait` of a config only the cluster side rejects (--no-validate): the job
    really runs `fleetrl train` from the uploaded dir, fails, and the error comes back."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["rollout"]["num_wrkers"] = 2  # a typo fleetrl train must name
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    r = _cli(head, "submit", str(tmp_path / "bad.yaml"), "run.steps=1", "--working-dir", str(tmp_path),
             "--no-validate", "--wait", "--timeout", "300", "--job-id", f"bad-{RUN}")
    print(f"\n[timing] submit --wait of a failing job {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"submitted job bad-{RUN}" in r.stdout
    assert "num_wrkers" in r.stdout and "FAILED" in r.stdout, r.stdout + r.stderr


def test_stop_ends_a_running_job(head):
    sleeper = "import time; print('sleeping', flush=True); time.sleep(300)"
    job_id = jobs.submit(command=["python", "-c", sleeper],
                         address=head.url, working_dir=REPO, token=head.token, job_id=f"sleeper-{RUN}")
    assert job_id == f"sleeper-{RUN}"
    deadline = time.monotonic() + 120
    while "sleeping" not in jobs.logs(job_id, address=head.url, token=head.token):
        assert time.monotonic() < deadline, jobs.status(job_id, address=head.url, token=head.token)
        time.sleep(0.5)
    t0 = time.perf_counter()
    r = _cli(head, "stop", job_id, "--wait", "--timeout", "60")
    print(f"\n[timing] stop --wait {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout + r.stderr
    r = _cli(head, "status", job_id)
    assert r.returncode == 1 and "STOPPED" in r.stdout  # a stopped job's status exits 1


def test_wrong_or_missing_token_and_unknown_job_say_what_to_do(head, monkeypatch):
    with pytest.raises(jobs.DeployError, match="not this cluster's token"):
        jobs.list_jobs(address=head.url, token="0" * 64)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(jobs.DeployError, match="RAY_AUTH_MODE=token"):
        jobs.list_jobs(address=head.url)
    with pytest.raises(jobs.DeployError, match="no job 'no-such-job'"):
        jobs.status("no-such-job", address=head.url, token=head.token)
    r = _cli(head, "status", "no-such-job")
    assert r.returncode == 2 and "fleetrl jobs" in r.stderr, r.stderr
