"""The python tool's sandbox (fleetrl.env.sandbox): every escape of issue 22 fed to it, each asserted
to fail inside the sandbox, both as a root worker (bwrap started as uid 65534) and as an
unprivileged one (a process of uid 4242 loading the module on its own, when these tests run as root).
Then: refusing to run where isolation cannot be set up, and the explicit unisolated opt-in."""

import glob
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import fleetrl.env.sandbox as sandbox_mod
from fleetrl.env.sandbox import Sandbox, SandboxLimits, SandboxResult, SandboxUnavailable, reachable
from fleetrl.env.tools import ToolEnv, run_python

SECRET = "hunter2-" + uuid.uuid4().hex
UNPRIVILEGED_UID = 4242
# As root: both kinds of worker. As a user: that user is the unprivileged worker.
MODES = ["root", "unprivileged"] if os.geteuid() == 0 else ["unprivileged"]

_DRIVER = """\
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sb
spec.loader.exec_module(sb)
job = json.load(sys.stdin)
r = sb.Sandbox(sb.SandboxLimits(**job["limits"])).run(job["code"])
print(json.dumps(r.__dict__))
"""


@pytest.fixture(scope="module")
def unprivileged_python():
    """(interpreter, directory with the module and a driver) that uid 4242 can use."""
    if os.geteuid() != 0:
        return None
    base = getattr(sys, "_base_executable", None) or sys.executable
    python = next((p for p in (os.path.realpath(base), "/usr/bin/python3", "/usr/local/bin/python3")
                   if reachable(p, UNPRIVILEGED_UID, UNPRIVILEGED_UID)), None)
    assert python is not None, "no python3 that an unprivileged user can run (install python3 under /usr)"
    where = tempfile.mkdtemp(prefix="fleetrl-sandbox-test-")
    os.chmod(where, 0o755)
    shutil.copy(sandbox_mod.__file__, os.path.join(where, "sandbox.py"))
    Path(where, "driver.py").write_text(_DRIVER)
    for name in ("sandbox.py", "driver.py"):
        os.chmod(os.path.join(where, name), 0o644)
    yield python, where
    shutil.rmtree(where)


@pytest.fixture(params=MODES)
def run(request, unprivileged_python, monkeypatch):
    """run(code, **limits) -> SandboxResult, from a worker whose environment holds SECRET."""
    monkeypatch.setenv("FLEETRL_TEST_SECRET", SECRET)
    if request.param == "root" or os.geteuid() != 0:
        return lambda code, **limits: run_python(code, **limits)
    python, where = unprivileged_python

    def as_user(code, **limits):
        job = json.dumps({"code": code, "limits": limits})
        p = subprocess.run([python, "-I", os.path.join(where, "driver.py"), os.path.join(where, "sandbox.py")],
                           input=job, capture_output=True, text=True, timeout=120, cwd=where,
                           user=UNPRIVILEGED_UID, group=UNPRIVILEGED_UID, extra_groups=[],
                           env={"PATH": "/usr/bin:/bin", "FLEETRL_TEST_SECRET": SECRET})
        assert p.returncode == 0, p.stderr
        return SandboxResult(**json.loads(p.stdout.strip().splitlines()[-1]))
    return as_user


def _processes_with(token: str) -> list[str]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                if token.encode() in f.read():
                    found.append(path)
        except OSError:
            pass
    return found


@pytest.fixture
def listener():
    """A TCP listener on the worker's loopback; after the test nothing may have connected."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s.getsockname()[1]
    with pytest.raises(BlockingIOError):
        s.accept()
    s.close()


# -- the escapes -------------------------------------------------------------------------------


def test_runs_code_in_a_private_scratch(run):
    r = run("import os\nopen('f.txt', 'w').write('x')\nprint(sum(range(10)), os.getcwd(), os.listdir('.'))")
    assert r.exit_code == 0 and not r.timed_out and not r.truncated
    assert r.output == "45 /tmp ['f.txt']\n"
    assert run("import os\nprint(os.listdir('.'))").output == "[]\n"  # each call its own scratch


def test_parent_environment_and_proc_are_out_of_reach(run):
    r = run("import os\nprint(sorted(os.environ.items()))\n"
            "for p in [f'/proc/{os.getppid()}/environ', '/proc/1/environ', '/proc/self/environ']:\n"
            "    try:\n        print(open(p).read())\n    except OSError as e:\n        print(type(e).__name__, p)\n"
            "print(os.getuid(), os.getgid(), os.getgroups(), os.getpid(), os.path.exists('/proc'))")
    assert SECRET not in r.output and "FLEETRL_TEST_SECRET" not in r.output
    assert r.output.count("FileNotFoundError /proc/") == 3
    assert r.output.endswith("65534 65534 [] 2 False\n"), r.output


def test_raw_socket_to_a_loopback_listener_fails(run, listener):
    r = run(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {listener}))\n"
            "print('CONNECTED')")
    assert r.exit_code != 0 and "CONNECTED" not in r.output
    assert "ConnectionRefusedError" in r.output or "unreachable" in r.output  # the sandbox's own empty loopback


def test_programs_reach_no_network(run, listener):
    """curl/wget (when installed) and bash's /dev/tcp, started from the model's code."""
    code = ["import shutil, subprocess", "out = []"]
    for argv in (["curl", "-sS", "-m", "2", f"http://127.0.0.1:{listener}/"],
                 ["wget", "-q", "-T", "2", "-t", "1", "-O", "-", f"http://127.0.0.1:{listener}/"],
                 ["bash", "-c", f"echo hi > /dev/tcp/127.0.0.1/{listener} && echo CONNECTED"]):
        if shutil.which(argv[0]):
            code.append(f"p = subprocess.run({argv!r}, capture_output=True, text=True)")
            code.append(f"print({argv[0]!r}, p.returncode, p.stdout, p.stderr)")
    r = run("\n".join(code))
    assert r.exit_code == 0 and "bash 1" in r.output and "CONNECTED" not in r.output, r.output
    if shutil.which("curl"):
        assert "curl 7" in r.output  # could not connect


def test_a_setsid_grandchild_dies_with_the_sandbox(run):
    for keep_running in (True, False):  # killed at the timeout / the main program ended first
        token = f"fleetrl-escape-{uuid.uuid4().hex}"
        code = ("import os, sys, time\n"
                "if os.fork() == 0:\n"
                "    os.setsid()\n"
                "    if os.fork() == 0:\n"
                "        os.execv(sys.executable, [sys.executable, '-c',\n"
                "                 'import time\\nwhile True:\\n    open(\"/tmp/alive\", \"a\").write(\"x\")\\n"
                "    time.sleep(0.05)', " + repr(token) + "])\n"
                "    os._exit(0)\n"
                "time.sleep(0.3)\n"
                "print('daemon started', flush=True)\n"
                + ("while True: time.sleep(1)\n" if keep_running else ""))
        r = run(code, timeout_s=1.5)
        assert r.output.startswith("daemon started") and r.timed_out == keep_running
        assert _processes_with(token) == []


def test_a_fork_bomb_is_capped_and_killed(run):
    r = run("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('forked', n, type(e).__name__)",
            max_processes=16)
    assert r.exit_code == 0 and r.output.startswith("forked ") and "BlockingIOError" in r.output
    assert int(r.output.split()[1]) <= 14  # the sandbox's PID 1 and the program count too
    token = f"fleetrl-bomb-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {token!r}])",
            timeout_s=2.0, max_processes=16)
    assert r.timed_out and time.monotonic() - t0 < 10
    assert _processes_with(token) == []
    assert subprocess.run(["true"]).returncode == 0  # the worker still forks


def test_writes_land_only_in_the_scratch(run, tmp_path):
    host_dir = tempfile.mkdtemp(prefix="fleetrl-open-")  # world-writable: only isolation keeps it clean
    os.chmod(host_dir, 0o777)
    try:
        targets = [f"{host_dir}/escape", "/escape", "/usr/escape", "/etc/escape", "/dev/escape",
                   "/sandbox/main.py", os.path.expanduser("~/escape"), f"{tempfile.gettempdir()}/../escape"]
        r = run("import os\n"
                f"for p in {targets!r}:\n"
                "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n"
                "    except OSError as e:\n        print('refused', p, type(e).__name__)\n"
                "open('/tmp/mine', 'w').write('x')\nopen('/dev/shm/mine', 'w').write('x')\nprint('scratch ok')")
        assert "WROTE" not in r.output and r.output.count("refused") == len(targets) and "scratch ok" in r.output
        assert os.listdir(host_dir) == [] and not os.path.exists("/escape")
        big = run("open('/tmp/big', 'wb').write(b'x' * (3 << 20))", scratch_mb=2)
        assert big.exit_code != 0 and ("File too large" in big.output or "No space left" in big.output
                                       or big.exit_code == 128 + 25)
    finally:
        shutil.rmtree(host_dir)


def test_a_fifo_in_place_of_the_output_does_not_block(run):
    r = run("import os\nos.mkfifo('/tmp/output.txt')\nos.mkfifo('output')\n"
            "try:\n    os.unlink('/sandbox/main.py')\nexcept OSError as e:\n    print(type(e).__name__)\n"
            "print(sorted(os.listdir('.')))", timeout_s=5.0)
    assert r.exit_code == 0 and r.output == "OSError\n['output', 'output.txt']\n" and r.seconds < 5
    # Output closed while the program goes on: the call still ends at its deadline.
    r = run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)", timeout_s=1.0)
    assert r.timed_out and r.seconds < 5


def test_endless_output_is_cut_and_killed(run):
    r = run("while True:\n    print('y' * 1000)", max_output_bytes=1000, timeout_s=30.0)
    assert r.truncated and len(r.output) == 1000 and r.exit_code is None and not r.timed_out
    assert r.seconds < 10 and r.observation().endswith("[output truncated; killed]")


def test_an_endless_loop_is_killed(run):
    r = run("while True:\n    pass", timeout_s=1.0, cpu_s=30)
    assert r.timed_out and r.exit_code is None and r.seconds < 5 and "timed out: killed" in r.observation()
    r = run("while True:\n    pass", timeout_s=30.0, cpu_s=1)
    assert r.exit_code == 128 + 24 and "[CPU time limit: killed]" in r.observation()  # SIGXCPU


def test_memory_is_capped(run):
    r = run("x = bytearray(400 * 1024 * 1024)\nprint('allocated')", memory_mb=256)
    assert r.exit_code != 0 and "MemoryError" in r.output and "allocated" not in r.output


def test_a_crash_is_an_observation(run):
    r = run("raise SystemExit(3)")
    assert r.exit_code == 3 and "exit code 3" in r.observation()


# -- set-up: fails closed --------------------------------------------------------------------


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "_probed", {})


def test_no_preexec_fn_and_no_inherited_environment(monkeypatch, fresh_probe):
    """preexec_fn can deadlock in a threaded process (a vLLM worker): the sandbox never uses it, and
    bwrap itself gets no variable of the worker's."""
    seen = []
    real = subprocess.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    monkeypatch.setenv("FLEETRL_TEST_SECRET", SECRET)
    assert run_python("print(1)").output == "1\n"
    assert run_python("print(2)", isolation="none").output == "2\n"
    assert len(seen) == 3  # the probe, then the two calls
    assert all(kw.get("preexec_fn") is None and SECRET not in json.dumps(kw.get("env")) for kw in seen)
    assert all(kw.get("start_new_session") for kw in seen)


def test_missing_bubblewrap_refuses_to_run(monkeypatch, fresh_probe):
    monkeypatch.setattr(sandbox_mod, "BWRAP", "fleetrl-no-such-bwrap")
    with pytest.raises(SandboxUnavailable) as e:
        run_python("print('ran')")
    assert "bubblewrap ('fleetrl-no-such-bwrap') is not installed" in str(e.value)
    assert "apt-get install -y bubblewrap" in str(e.value) and "isolation: none" in str(e.value)
    env = ToolEnv()
    with pytest.raises(SandboxUnavailable):
        env.preflight()
    import asyncio

    with pytest.raises(SandboxUnavailable):  # not an observation: the tool refuses, the run is told
        asyncio.run(env.step('<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>'))
    assert ToolEnv(tools=["calculator"]).preflight() is None  # no sandbox needed


@pytest.fixture
def fake_bwrap(monkeypatch):
    """BWRAP set to a script (that the sandbox's user can run) with the given body."""
    where = tempfile.mkdtemp(prefix="fleetrl-fake-bwrap-")
    os.chmod(where, 0o755)

    def make(body: str, mode: int = 0o755) -> str:
        path = Path(where, "bwrap")
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(mode)
        monkeypatch.setattr(sandbox_mod, "BWRAP", str(path))
        return str(path)
    yield make
    shutil.rmtree(where)


def test_namespaces_not_allowed_refuses_with_what_to_change(fresh_probe, fake_bwrap):
    fake_bwrap("echo 'bwrap: No permissions to creating new namespace, likely because the kernel does not allow "
               "non-privileged user namespaces.' >&2\nexit 1\n")
    with pytest.raises(SandboxUnavailable) as e:
        Sandbox().probe()
    message = str(e.value)
    assert "cannot be set up on this machine" in message and "No permissions to creating new namespace" in message
    assert "enable unprivileged user namespaces" in message and "docs/sandbox.md" in message


def test_a_sandbox_that_starts_but_does_not_isolate_is_refused(fresh_probe, fake_bwrap):
    """A "bwrap" whose programs see the host's network and environment fails the probe."""
    fake_bwrap("echo \"['eth0', 'lo'] ['AWS_SECRET_ACCESS_KEY', 'HOME']\"\n")
    with pytest.raises(SandboxUnavailable, match=r"started but does not isolate as expected .*the probe saw "
                                                 r"\"\['eth0', 'lo'\] \['AWS_SECRET_ACCESS_KEY'"):
        Sandbox().probe()


def test_a_bwrap_that_cannot_be_started_is_refused(fresh_probe, fake_bwrap):
    path = fake_bwrap("exit 0\n", mode=0o700 if os.geteuid() == 0 else 0o600)
    with pytest.raises(SandboxUnavailable, match=f"starting {path} as uid \\d+ failed: .*Permission denied"):
        Sandbox().probe()


def test_an_interpreter_the_sandbox_user_cannot_read_is_refused(fresh_probe, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "python3").write_text("")
    with pytest.raises(SandboxUnavailable, match=r"rollout.episode.env_kwargs.python=.* is not an interpreter that "
                                                 r"uid \d+ \(the sandbox's user\) can read and run"):
        Sandbox(SandboxLimits(python=str(private / "python3"))).run("print(1)")


def test_reachable():
    assert reachable("/bin/sh", 4242, 4242)
    d = tempfile.mkdtemp()
    try:
        Path(d, "x").write_text("")
        os.chmod(Path(d, "x"), 0o755)
        assert not reachable(f"{d}/x", 4242, 4242)  # mkdtemp: 0700
        os.chmod(d, 0o711)
        assert reachable(f"{d}/x", 4242, 4242)
        os.chmod(Path(d, "x"), 0o700)
        assert not reachable(f"{d}/x", 4242, 4242) and stat.S_IMODE(os.stat(d).st_mode) == 0o711
    finally:
        shutil.rmtree(d)


def test_isolation_none_is_an_explicit_loud_opt_in(caplog, fresh_probe, monkeypatch):
    monkeypatch.setattr(sandbox_mod, "_warned", set())
    monkeypatch.setattr(sandbox_mod, "BWRAP", "fleetrl-no-such-bwrap")  # not needed without isolation
    with caplog.at_level(logging.WARNING, logger="fleetrl.env.sandbox"):
        env = ToolEnv(isolation="none", timeout_s=5.0)
    assert any(r.levelno == logging.WARNING and "WITHOUT isolation" in r.getMessage() for r in caplog.records)
    assert "UNISOLATED" in env.preflight()
    r = env.sandbox.run("import os\nprint(os.getcwd().startswith(os.environ['TMPDIR']), len(os.environ) <= 5)")
    assert r.output == "True True\n"


def test_limits_are_checked():
    with pytest.raises(ValueError, match=r"timeout_s=0 must be a positive number of seconds; uid=0 must be an "
                                         r"unprivileged uid"):
        SandboxLimits(timeout_s=0, uid=0)


def test_the_sandbox_holds_no_descriptor_and_cannot_read_root_only_files(run):
    r = run("import os\nfds = []\nfor fd in range(256):\n    try:\n        os.fstat(fd)\n        fds.append(fd)\n"
            "    except OSError:\n        pass\nprint(fds)\n"
            "try:\n    open('/etc/shadow').read()\n    print('READ')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    assert r.output.splitlines()[0] == "[0, 1, 2]"  # no code memfd, no info pipe, nothing of the worker's
    assert "READ" not in r.output


def test_a_rollout_worker_checks_the_sandbox_before_its_first_episode(monkeypatch, fresh_probe, tiny_policy):
    """A worker on a node without bubblewrap fails every episode with one message naming itself,
    before any model code could run (rollout.episode.on_error does not apply)."""
    import asyncio

    from fleetrl.rollout.config import RolloutConfig
    from fleetrl.rollout.worker import RolloutWorker

    monkeypatch.setattr(sandbox_mod, "BWRAP", "fleetrl-no-such-bwrap")
    worker = object.__new__(RolloutWorker)  # no engine: only the environment set-up is under test
    worker.cfg = RolloutConfig(environment="fleetrl.env.tools:ToolEnv", episode={"on_error": "zero"})
    worker.model_path, worker.worker_index = str(tiny_policy), 3
    with pytest.raises(RuntimeError, match=r"rollout worker 3: environment fleetrl.env.tools:ToolEnv cannot run on "
                                           r"this node: SandboxUnavailable: bubblewrap \('fleetrl-no-such-bwrap'\) "
                                           r"is not installed"):
        asyncio.run(worker._build_env())
    monkeypatch.setattr(sandbox_mod, "BWRAP", "bwrap")
    env_cls, delta = asyncio.run(worker._build_env())
    assert env_cls is ToolEnv and delta.tokenizer is not None
