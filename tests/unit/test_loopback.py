"""The local Ray fleetrl starts listens on loopback only (issue 11, "closed by default").

Each case starts Ray in a fresh interpreter through fleetrl's own ``connect_ray`` (the pytest process
already has ray imported and the loopback variable set by conftest, so it could not tell), runs one
task so a worker process exists too, and lists the listening sockets of that interpreter and every
process below it (gcs_server, raylet, the dashboard and its agent, the metrics export port, runtime-env
agent, workers) with psutil. The dashboard is on, as by default where ray[default] is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

PROBE = r"""
import ipaddress, json, sys
first = sys.argv[1]
if first == "ray":
    import ray  # a user's script that imports ray before fleetrl
from fleetrl.run.config import RayConfig
from fleetrl.run.runtime import connect_ray, dashboard_available, watch_urls
import psutil
import ray

connect_ray(RayConfig(num_cpus=1, namespace="fleetrl-loopback-test"))
try:
    assert ray.get(ray.remote(lambda: 1).options(num_cpus=0).remote(), timeout=60) == 1
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    seen = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in pids or not c.laddr:
            continue
        listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # TCP listen, unbound UDP
        if not listening:
            continue
        try:
            name = psutil.Process(c.pid).name()
        except psutil.Error:
            name = "?"
        ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        seen.append({"proc": name, "ip": c.laddr.ip, "port": c.laddr.port, "loopback": ip.is_loopback})
    urls = dict(watch_urls())
    print("RESULT " + json.dumps({"node_ip": ray.util.get_node_ip_address(), "sockets": seen, "urls": urls,
                                  "dashboard_deps": dashboard_available()}), flush=True)
finally:
    ray.shutdown()
"""


@pytest.mark.parametrize("first", ["fleetrl", "ray"])
def test_local_ray_listens_on_loopback_only(first, tmp_path):
    pytest.importorskip("psutil")
    ray_tmp = tempfile.mkdtemp(prefix="flr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmp  # its own session dir: never attaches to another local Ray
    try:
        out = subprocess.run([sys.executable, "-c", PROBE, first], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["node_ip"] == "127.0.0.1"
    procs = {s["proc"] for s in result["sockets"]}
    assert {"gcs_server", "raylet"} <= procs, result  # the check saw Ray's own listeners
    if result["dashboard_deps"]:  # on by default: its web server and the metrics agent were checked too
        from urllib.parse import urlparse

        ports = {s["port"] for s in result["sockets"]}
        for what in ("dashboard", "metrics"):
            url = urlparse(result["urls"][what])
            assert url.hostname == "127.0.0.1" and url.port in ports, (what, result)
    exposed = [s for s in result["sockets"] if not s["loopback"]]
    assert not exposed, f"Ray processes listen on non-loopback addresses: {exposed}"


def test_joining_a_cluster_undoes_the_loopback_default(monkeypatch):
    """ray.address names a cluster: fleetrl's own loopback default must not change how the driver joins."""
    import fleetrl
    from fleetrl.run import runtime

    ray_constants = pytest.importorskip("ray._private.ray_constants")
    calls = []
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(fleetrl, "_loopback_set_here", True)
    monkeypatch.setenv(fleetrl.LOOPBACK_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.connect_ray(runtime.RayConfig(address="10.0.0.5:6379"))
    assert calls == [{"address": "10.0.0.5:6379", "namespace": "fleetrl"}]
    assert fleetrl.LOOPBACK_ENV_VAR not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is (not ray_constants.IS_WINDOWS_OR_OSX)


def test_joining_keeps_a_value_the_user_exported(monkeypatch):
    import fleetrl
    from fleetrl.run import runtime

    ray_constants = pytest.importorskip("ray._private.ray_constants")
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", lambda **kw: None)
    monkeypatch.setattr(fleetrl, "_loopback_set_here", False)
    monkeypatch.setenv(fleetrl.LOOPBACK_ENV_VAR, "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    runtime.connect_ray(runtime.RayConfig())
    assert os.environ[fleetrl.LOOPBACK_ENV_VAR] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False


def test_the_package_sets_the_variable_before_ray_is_imported():
    """`fleetrl`, `python -m fleetrl` and bench/ all import the package first; joining via RAY_ADDRESS is untouched."""
    probe = ("import os, sys; import fleetrl; print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'), "
             "'ray' in sys.modules)")
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", probe], env={**base, "RAY_ADDRESS": "10.0.0.5:6379"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", probe], env={**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False"], out.stderr
