"""Run model-written code in a sandbox that fails closed.

Standard library only (no fleetrl, no pydantic imports), so the module can be loaded on its own.

With ``isolation="bubblewrap"`` (the default) every call is one ``bwrap`` sandbox:

- its own user, PID, network, mount, IPC, UTS (and where possible cgroup) namespaces; nested user
  namespaces disabled; a new session (no terminal injection);
- the network namespace is empty: no interface but a loopback of its own, so no socket of any kind
  (``_socket``, ``curl``, raw syscalls) reaches the worker, the node or the internet;
- an empty environment (``--clearenv``) and no ``/proc`` at all: the worker's ``/proc/<pid>/environ``
  does not exist in there, and the worker's processes are not in its PID namespace;
- a read-only view of the system (``/usr``, ``/etc``, the interpreter's prefix) on a read-only root,
  and the only writable places are two size-capped tmpfs: ``/tmp`` (cwd and HOME, the scratch) and
  ``/dev/shm``, both gone with the sandbox. The code itself is copied in read-only from a memfd, so
  no file of the worker's is ever opened on the code's behalf;
- its own identity: uid/gid 65534 inside. A worker running as root starts bwrap as the unprivileged
  ``uid`` (default 65534, "nobody") with no supplementary groups, so the sandbox is no one outside
  too (root-owned files are not the sandbox's, unlike a plain user-namespace mapping of root);
- limits set by a launcher inside the sandbox before the code starts: processes and threads
  (``RLIMIT_NPROC``, counted per sandbox because each has its own user namespace), CPU seconds,
  address space, file size and open files; output is read from a pipe with a byte cap;
- on timeout or too much output the sandbox's PID 1 is killed, which kills every process in its PID
  namespace (``setsid``/double fork do not leave it); ``--die-with-parent`` does the same when the
  worker dies. Every process is gone when :meth:`Sandbox.run` returns.

Nothing is set up with ``preexec_fn`` (unsafe in a threaded process such as a vLLM worker): the uid
switch, the new session and the passed descriptors are ``subprocess`` features done in its fork
child without Python code.

When bubblewrap is missing or cannot create its namespaces, :meth:`Sandbox.probe` and
:meth:`Sandbox.run` raise :class:`SandboxUnavailable` saying what to change: nothing runs. Only
``isolation="none"`` (an explicit opt-in, logged as a warning every time a sandbox is built) runs code
without isolation: a plain subprocess with the same limits, an empty environment and a private
scratch directory, but the worker's network, file system view and ``/proc``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ISOLATIONS = ("bubblewrap", "none")
BWRAP = "bwrap"  # the bubblewrap executable (a name looked up on PATH, or a path)
SANDBOX_ID = 65534  # uid and gid inside the sandbox
SCRIPT = "/sandbox/main.py"  # where the code lies inside the sandbox (read-only)
_PROBE_TIMEOUT_S = 20.0
_KILL_WAIT_S = 10.0
_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs first inside the sandbox (python -I -c): the limits, then the code in a fresh interpreter.
# A limit lowered here cannot be raised again by the code (its hard limit is set too; CPU time gets one
# second more, so the soft limit's SIGXCPU says what happened before the hard limit's SIGKILL).
_LAUNCHER = """\
import os, resource, sys
for name, soft, hard in {limits!r}:
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.execv(sys.executable, [sys.executable, "-I", {script!r}])
"""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up on this machine, so model-written code is not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one call may use. ``cpu_s`` None: the wall-clock timeout, rounded up."""

    timeout_s: float = 10.0  # wall clock, from start to kill
    memory_mb: int = 512  # address space of each process
    max_output_bytes: int = 16384  # stdout + stderr; more is cut and the sandbox killed
    max_processes: int = 32  # processes and threads in the sandbox (its launcher included)
    cpu_s: int | None = None  # CPU seconds of each process
    scratch_mb: int = 64  # size of /tmp (and of /dev/shm); also the largest file
    isolation: str = "bubblewrap"  # or "none": no isolation (explicit, logged opt-in)
    python: str | None = None  # interpreter inside the sandbox (None: this one's base interpreter)
    uid: int = 65534  # a root worker starts the sandbox as this unprivileged user (and group)

    def __post_init__(self):
        checks = [("timeout_s", self.timeout_s > 0 and math.isfinite(self.timeout_s), "a positive number of seconds"),
                  ("memory_mb", self.memory_mb >= 32, "at least 32"),
                  ("max_output_bytes", self.max_output_bytes >= 1, "at least 1"),
                  ("max_processes", self.max_processes >= 2, "at least 2 (the launcher and the code)"),
                  ("cpu_s", self.cpu_s is None or self.cpu_s >= 1, "at least 1, or null for timeout_s"),
                  ("scratch_mb", self.scratch_mb >= 1, "at least 1"),
                  ("isolation", self.isolation in ISOLATIONS, f"one of {list(ISOLATIONS)}"),
                  ("uid", 0 < self.uid < 2**32 - 1, "an unprivileged uid (not 0)")]
        bad = [f"{name}={getattr(self, name)!r} must be {want}" for name, ok, want in checks if not ok]
        if bad:
            raise ValueError("sandbox limits: " + "; ".join(bad))

    def rlimits(self, processes: bool = True) -> list[tuple[str, int, int]]:
        """The launcher's limits (name, soft, hard). ``processes`` False (no isolation): RLIMIT_NPROC
        would count every process of the worker's user, not the call's, so it is left out."""
        cpu = self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))
        same = [("RLIMIT_NPROC", self.max_processes)] * processes + [
            ("RLIMIT_AS", self.memory_mb << 20), ("RLIMIT_FSIZE", self.scratch_mb << 20),
            ("RLIMIT_NOFILE", 256), ("RLIMIT_CORE", 0)]
        return [("RLIMIT_CPU", cpu, cpu + 1)] + [(name, v, v) for name, v in same]


@dataclass
class SandboxResult:
    output: str  # stdout then stderr (interleaved as written), cut at the cap
    exit_code: int | None  # None: killed (timeout or output cap); negative: killed by that signal
    timed_out: bool = False
    truncated: bool = False
    seconds: float = 0.0

    def observation(self) -> str:
        notes = []
        if self.timed_out:
            notes.append("timed out: killed")
        elif self.exit_code == -signal.SIGXCPU or self.exit_code == 128 + signal.SIGXCPU:
            notes.append("CPU time limit: killed")
        elif self.exit_code not in (0, None):
            notes.append(f"exit code {self.exit_code}")
        if self.truncated:
            notes.append("output truncated" + ("; killed" if self.exit_code is None and not self.timed_out else ""))
        return self.output + (f"\n[{'; '.join(notes)}]" if notes else "")


def reachable(path: str, uid: int, gid: int) -> bool:
    """Whether a process of ``uid``/``gid`` (no supplementary groups) can read and execute ``path``:
    every directory above it searchable, the file readable and executable (symlinks resolved)."""
    try:
        real = os.path.realpath(path)
        parts = real.split(os.sep)
        for i in range(1, len(parts)):
            st = os.stat(os.sep + os.path.join(*parts[1:i]) if i > 1 else os.sep)
            if not _allowed(st, uid, gid, 1):
                return False
        st = os.stat(real)
        return stat.S_ISREG(st.st_mode) and _allowed(st, uid, gid, 4) and _allowed(st, uid, gid, 1)
    except OSError:
        return False


def _allowed(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


_warned: set[tuple] = set()
_probed: dict[tuple, str] = {}
_probe_lock = threading.Lock()


class Sandbox:
    """Runs Python code under ``limits``; one instance may serve many calls (from many threads)."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self.as_root = os.geteuid() == 0
        # The user that starts bwrap: a root worker drops to limits.uid first.
        self.runner_ids = (self.limits.uid, self.limits.uid) if self.as_root else (os.getuid(), os.getgid())
        if self.limits.isolation == "none" and self.limits not in _warned:
            _warned.add(self.limits)
            log.warning("!!! rollout.episode.env_kwargs.isolation: none -- model-written code runs WITHOUT "
                        "isolation, with this worker's network, file system and /proc (its environment and "
                        "secrets included). Use it only where nothing can be stolen or broken. !!!")

    # -- set-up ------------------------------------------------------------------------------

    def python(self) -> str:
        """The interpreter run inside the sandbox: ``limits.python``, else this process's base
        interpreter when the sandbox's user can reach it, else /usr/bin/python3 or
        /usr/local/bin/python3. SandboxUnavailable when none can be run."""
        uid, gid = self.runner_ids
        if self.limits.python is not None:
            if not reachable(self.limits.python, uid, gid):
                raise SandboxUnavailable(
                    f"rollout.episode.env_kwargs.python={self.limits.python!r} is not an interpreter that uid {uid} "
                    "(the sandbox's user) can read and run; set it to one under a world-readable prefix "
                    "(e.g. /usr/bin/python3)")
            return self.limits.python
        base = getattr(sys, "_base_executable", None) or sys.executable
        candidates = [os.path.realpath(base), "/usr/bin/python3", "/usr/local/bin/python3"]
        found = next((c for c in candidates if reachable(c, uid, gid)), None)
        if found is None:
            raise SandboxUnavailable(
                f"no Python interpreter that uid {uid} (the sandbox's user) can run: tried {candidates} (a directory "
                "above this worker's interpreter is private, e.g. /root is 0700); install python3 under /usr or set "
                "rollout.episode.env_kwargs.python to an interpreter under a world-readable prefix")
        return found

    def _bwrap(self) -> str:
        found = shutil.which(BWRAP)
        if found is None:
            raise SandboxUnavailable(
                f"bubblewrap ({BWRAP!r}) is not installed on this machine, so the python tool cannot isolate "
                "model-written code and refuses to run it: install it (Debian/Ubuntu: apt-get install -y "
                "bubblewrap; in an image: see docs/sandbox.md), or set rollout.episode.env_kwargs.isolation: none "
                "to run it WITHOUT isolation (unsafe)")
        return found

    def command(self, bwrap: str, python: str, code_fd: int, info_fd: int) -> list[str]:
        """The bwrap command line for one call (the code comes from ``code_fd``; bwrap writes the
        sandbox's PID 1 to ``info_fd``)."""
        lim = self.limits
        scratch = str(lim.scratch_mb << 20)
        args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
                "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--hostname", "sandbox",
                "--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = "/" + top
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        args += ["--ro-bind-try", "/etc", "/etc"]
        for prefix in sorted({os.path.dirname(os.path.dirname(os.path.abspath(python))),
                              os.path.dirname(os.path.dirname(os.path.realpath(python)))}):
            if prefix != "/usr" and not prefix.startswith("/usr/"):
                args += ["--ro-bind", prefix, prefix]
        args += ["--dev", "/dev", "--size", scratch, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
                 "--size", scratch, "--tmpfs", "/tmp", "--ro-bind-data", str(code_fd), SCRIPT,
                 "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
                 "--setenv", "PATH", _PATH, "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
                 "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONIOENCODING", "utf-8",
                 "--", python, "-I", "-c", _LAUNCHER.format(limits=lim.rlimits(), script=SCRIPT)]
        return args

    def probe(self) -> str:
        """Run a tiny program in the sandbox (once per process and limits) and check what it sees.
        Returns a one-line description; SandboxUnavailable (what to change) when isolation does not work."""
        key = (self.limits, self.runner_ids)
        with _probe_lock:
            if key in _probed:
                return _probed[key]
            if self.limits.isolation == "none":
                note = "isolation: none -- model-written code runs UNISOLATED (explicit opt-in)"
            else:
                note = self._probe_bwrap()
            _probed[key] = note
            return note

    def _probe_bwrap(self) -> str:
        check = ("import os, socket\n"
                 "assert not os.path.exists('/proc/self'), '/proc is visible'\n"
                 f"assert os.getuid() == {SANDBOX_ID}, f'uid {{os.getuid()}}'\n"
                 "assert os.getpid() <= 3, f'pid {os.getpid()}: no PID namespace'\n"
                 "print(sorted(n for _, n in socket.if_nameindex()), sorted(os.environ))\n")
        result = self._run_bwrap(check, timeout_s=_PROBE_TIMEOUT_S)
        expected = f"['lo'] {sorted(['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONIOENCODING', 'TMPDIR'])}"
        if result.exit_code != 0:
            raise SandboxUnavailable(_setup_failure(result.output, self.runner_ids[0], self.as_root))
        if result.output.strip().splitlines()[-1:] != [expected]:
            raise SandboxUnavailable(f"the bubblewrap sandbox started but does not isolate as expected (network "
                                     f"interfaces and environment variables should be {expected}, the probe saw "
                                     f"{result.output.strip()[-300:]!r}), so the python tool refuses to run "
                                     "model-written code; check the bwrap version (>= 0.8)")
        uid = self.runner_ids[0]
        who = f"started as uid {uid} (this worker is root)" if self.as_root else f"started as uid {uid}"
        return (f"bubblewrap sandbox works ({who}; own user/pid/net/mount namespaces, no /proc, empty environment, "
                f"read-only system, {self.limits.scratch_mb} MiB scratch, <= {self.limits.max_processes} processes)")

    # -- one call ----------------------------------------------------------------------------

    def run(self, code: str) -> SandboxResult:
        """Run ``code``; its output, exit code and what was cut or killed. SandboxUnavailable (and
        nothing run) when isolation cannot be set up."""
        if self.limits.isolation == "none":
            return self._run_unisolated(code)
        self.probe()
        return self._run_bwrap(code, timeout_s=self.limits.timeout_s)

    def _run_bwrap(self, code: str, timeout_s: float) -> SandboxResult:
        bwrap, python = self._bwrap(), self.python()
        code_fd = os.memfd_create("fleetrl-sandbox-code", os.MFD_CLOEXEC)
        info_r, info_w = os.pipe()
        try:
            os.write(code_fd, code.encode("utf-8", errors="surrogatepass"))
            os.lseek(code_fd, 0, os.SEEK_SET)
            uid, gid = self.runner_ids
            as_user = {"user": uid, "group": gid, "extra_groups": []} if self.as_root else {}
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(self.command(bwrap, python, code_fd, info_w), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={"PATH": _PATH},
                                        cwd="/", pass_fds=(code_fd, info_w), start_new_session=True,
                                        close_fds=True, **as_user)
            except OSError as e:
                raise SandboxUnavailable(_setup_failure(f"starting {bwrap} as uid {uid} failed: {e}", uid,
                                                        self.as_root)) from None
        except BaseException:
            os.close(info_r)
            raise
        finally:
            os.close(code_fd)
            os.close(info_w)
        init: list[int] = []
        reader = threading.Thread(target=_read_init_pid, args=(info_r, init), daemon=True)
        reader.start()

        def kill() -> None:
            # The sandbox's PID 1: the kernel kills every process of its PID namespace with it, and bwrap
            # (our child) exits only once they are all gone. Killing bwrap itself first would return
            # while they are still dying (--die-with-parent would get them a moment later).
            reader.join(timeout=1.0)
            if init:
                _signal(lambda: os.kill(init[0], signal.SIGKILL))
                try:
                    proc.wait(timeout=_KILL_WAIT_S)
                    return
                except subprocess.TimeoutExpired:
                    pass
            _signal(lambda: os.killpg(proc.pid, signal.SIGKILL))

        return _collect(proc, kill, timeout_s, self.limits.max_output_bytes, t0)

    def _run_unisolated(self, code: str) -> SandboxResult:
        with tempfile.TemporaryDirectory(prefix="fleetrl-unisolated-") as scratch:
            t0 = time.monotonic()
            launcher = _LAUNCHER.format(limits=self.limits.rlimits(processes=False), script="main.py")
            with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(code)
            proc = subprocess.Popen([self.limits.python or sys.executable, "-I", "-c", launcher], cwd=scratch,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={"PATH": _PATH, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"},
                                    start_new_session=True, close_fds=True)
            return _collect(proc, lambda: _signal(lambda: os.killpg(proc.pid, signal.SIGKILL)),
                            self.limits.timeout_s, self.limits.max_output_bytes, t0)


def _signal(send) -> None:
    try:
        send()
    except (ProcessLookupError, PermissionError):
        pass


def _read_init_pid(fd: int, out: list[int]) -> None:
    """bwrap's --info-fd: one JSON object with the sandbox's PID 1 as seen from here (``child-pid``)."""
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
            try:
                info, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", errors="replace").lstrip())
            except ValueError:
                continue
            pid = info.get("child-pid") if isinstance(info, dict) else None
            if isinstance(pid, int) and pid > 1:
                out.append(pid)
            return
    finally:
        os.close(fd)


def _collect(proc: subprocess.Popen, kill, timeout_s: float, cap: int, t0: float) -> SandboxResult:
    """Read the merged output pipe up to ``cap`` bytes until EOF and exit, or the deadline; kill on
    the deadline or past the cap. Every process of the call has exited when this returns."""
    deadline = t0 + timeout_s
    out = bytearray()
    timed_out = over = False
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if not sel.select(left):
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break  # EOF: every process holding the pipe has closed it
                out += chunk
                if len(out) > cap:
                    over = True
                    break
        if not (timed_out or over):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # closed its output but kept running
                timed_out = True
        if timed_out or over:
            kill()
        proc.wait(timeout=_KILL_WAIT_S)
    except BaseException:
        kill()
        proc.wait(timeout=_KILL_WAIT_S)
        raise
    finally:
        proc.stdout.close()
    truncated = over or len(out) > cap
    text = bytes(out[:cap]).decode("utf-8", errors="replace")
    code = None if (timed_out or over) else proc.returncode
    return SandboxResult(text, code, timed_out, truncated, time.monotonic() - t0)


def _setup_failure(output: str, uid: int, as_root: bool) -> str:
    said = " ".join(output.strip().splitlines()[-3:])[:400] or "no output"
    hint = ("this machine does not let an unprivileged user create namespaces: enable unprivileged user "
            "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 where it exists, "
            "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), or in a container allow them "
            "(Kubernetes: see docs/sandbox.md)")
    if "Permission denied" in said and "source path" in said:
        hint = (f"uid {uid} (the sandbox's user) cannot read a directory the sandbox binds; make the interpreter's "
                "prefix world-readable or set rollout.episode.env_kwargs.python")
    started = f" (started as uid {uid})" if as_root else ""
    return (f"the bubblewrap sandbox cannot be set up on this machine{started}: "
            f"{said}. So the python tool refuses to run model-written code: {hint}; or set "
            "rollout.episode.env_kwargs.isolation: none to run it WITHOUT isolation (unsafe)")
