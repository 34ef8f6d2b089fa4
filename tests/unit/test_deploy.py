"""deploy/: runtime_env and entrypoint building, address and token rules, what gets uploaded,
local config checks, the CLI, and the cluster manifests (no cluster needed)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from fleetrl.deploy import cli, jobs
from fleetrl.deploy.jobs import DeployError

REPO = Path(__file__).resolve().parents[2]
ROLLOUT_RESOURCE, LEARNER_RESOURCE = "fleetrl_rollout", "fleetrl_learner"
COMMANDS = ("submit", "status", "logs", "stop", "jobs")


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if anything tries to reach a cluster."""

    def refuse(*a, **k):
        raise AssertionError("this should have failed before contacting a cluster")

    monkeypatch.setattr(jobs, "_Cluster", refuse)


class FakeClient:
    def __init__(self):
        self.submitted = []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


@pytest.fixture
def fake_cluster(monkeypatch):
    client = FakeClient()
    seen = {}

    class Cluster:
        def __init__(self, address, token):
            seen.update(address=address, token=token)
            self.client = client
            self.url = address

        def call(self, job_id=None):
            import contextlib

            return contextlib.nullcontext()

    monkeypatch.setattr(jobs, "_Cluster", Cluster)
    return client, seen


# ---------------------------------------------------------------------------------------------
# Address and token


def test_address_from_argument_then_api_server_then_ray_address():
    env = {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert jobs.resolve_address("http://c:8265/", env) == "http://c:8265"
    assert jobs.resolve_address(None, env) == "http://b:8265"
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:8265"}) == "http://10.0.0.1:8265"
    assert jobs.resolve_address("auto", {}) == "auto"
    assert jobs.resolve_address("https://ray.example.com", {}) == "https://ray.example.com"


def test_no_address_says_where_to_put_one():
    with pytest.raises(DeployError, match=r"--address.*http://HEAD:8265.*RAY_ADDRESS"):
        jobs.resolve_address(None, {})


def test_token_only_in_token_mode_from_ray_sources_in_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    assert jobs.auth_token({}, home) is None  # auth disabled: nothing sent
    token_env = {"RAY_AUTH_MODE": "token"}
    assert jobs.auth_token(token_env, home) == "from-home"
    assert jobs.auth_token(token_env | {"RAY_AUTH_TOKEN_PATH": str(path_file)}, home) == "from-path"
    env = token_env | {"RAY_AUTH_TOKEN_PATH": str(path_file), "RAY_AUTH_TOKEN": " inline "}
    assert jobs.auth_token(env, home) == "inline"


def test_token_mode_without_a_token_says_how_to_get_it(tmp_path):
    with pytest.raises(DeployError, match="ray get-auth-token"):
        jobs.auth_token({"RAY_AUTH_MODE": "token"}, tmp_path)
    with pytest.raises(DeployError, match="is not a file"):
        jobs.auth_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")}, tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("\n")
    with pytest.raises(DeployError, match="empty"):
        jobs.auth_token({"RAY_AUTH_MODE": "token"}, tmp_path)


# ---------------------------------------------------------------------------------------------
# runtime_env, env vars, entrypoint


def test_runtime_env_has_working_dir_excludes_env_and_optional_pip(tmp_path):
    env = jobs.build_runtime_env(tmp_path, env_vars={"WANDB_PROJECT": "x"})
    assert env["working_dir"] == str(tmp_path)
    assert {".git/", ".venv/", "runs/", "__pycache__/"} <= set(env["excludes"])
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "WANDB_PROJECT": "x"}
    assert "pip" not in env  # the cluster image has the dependencies unless asked
    assert jobs.build_runtime_env(tmp_path, pip=["wandb==0.19"])["pip"] == ["wandb==0.19"]
    req = tmp_path / "requirements.txt"
    req.write_text("wandb\n")
    assert jobs.build_runtime_env(tmp_path, pip=str(req))["pip"] == str(req)
    with pytest.raises(DeployError, match="does not exist"):
        jobs.build_runtime_env(tmp_path, pip=str(tmp_path / "missing.txt"))
    with pytest.raises(DeployError, match="must be strings"):
        jobs.build_runtime_env(tmp_path, env_vars={"N": 3})


def test_runtime_env_is_accepted_by_ray(tmp_path):
    from ray.runtime_env import RuntimeEnv

    req = tmp_path / "requirements.txt"
    req.write_text("wandb\nrich>=13\n")
    env = RuntimeEnv(**jobs.build_runtime_env(tmp_path, pip=str(req), env_vars={"A": "1"})).to_dict()
    assert env["pip"]["packages"] == ["wandb", "rich>=13"]  # Ray read the file on this side
    assert env["env_vars"]["A"] == "1"


def test_env_pairs(monkeypatch):
    environ = {"WANDB_API_KEY": "secret"}
    assert jobs.parse_env_pairs(["A=1", "B=x=y", "WANDB_API_KEY"], environ) == {
        "A": "1", "B": "x=y", "WANDB_API_KEY": "secret"}
    with pytest.raises(DeployError, match="not set here"):
        jobs.parse_env_pairs(["HF_TOKEN"], environ)
    with pytest.raises(DeployError, match="KEY=VALUE"):
        jobs.parse_env_pairs(["1BAD=x"], environ)


def test_train_command_is_relative_to_the_working_dir():
    cmd = jobs.train_command(REPO / "examples/grpo_tiny.yaml", ["run.steps=2", "run.name=a b"], REPO)
    assert cmd == ["fleetrl", "train", "examples/grpo_tiny.yaml", "run.steps=2", "run.name=a b"]
    assert shlex.split(shlex.join(cmd)) == cmd  # the entrypoint is a shell line: quoting survives
    assert jobs.train_command(REPO / "examples/grpo_tiny.yaml", [], REPO, launcher="python")[:4] == [
        "python", "-m", "fleetrl.cli", "train"]
    with pytest.raises(DeployError, match="launcher"):
        jobs.train_command(REPO / "examples/grpo_tiny.yaml", [], REPO, launcher="bash")


def test_config_outside_the_working_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DeployError, match=r"outside the working dir.*--working-dir"):
        jobs.relative_config(REPO / "examples/grpo_tiny.yaml", tmp_path)
    with pytest.raises(DeployError, match="not found"):
        jobs.relative_config(tmp_path / "nope.yaml", tmp_path)
    (tmp_path / "here.yaml").write_text("algorithm: grpo\n")
    with pytest.raises(DeployError, match=r"relative to the current directory.*did you mean"):
        jobs.relative_config("here.yaml", tmp_path)  # the CWD is not tmp_path


def test_default_job_id():
    job_id = jobs.default_job_id("examples/GRPO_tiny.yaml")
    assert re.fullmatch(r"fleetrl-grpo-tiny-\d{8}-\d{6}-[0-9a-f]{4}", job_id), job_id
    assert jobs.default_job_id(None).startswith("fleetrl-job-")


# ---------------------------------------------------------------------------------------------
# What gets uploaded: the same answer as Ray's own packaging


def _tree(root: Path) -> None:
    files = {
        "cfg.yaml": "", "data/train.jsonl": "", "data/private/secret.jsonl": "", "runs/r1/metrics.jsonl": "",
        "pkg/rules.py": "", "pkg/__pycache__/rules.cpython-311.pyc": "", "pkg/build/out.bin": "",
        "pkg/keep.log": "", "notes/a.md": "", "big.ckpt": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".gitignore").write_text("data/private/\n*.log\n")
    (root / ".rayignore").write_text("*.ckpt\n")
    (root / "pkg" / ".gitignore").write_text("build/\n!keep.log\n")


def test_upload_blocker_names_the_rule(tmp_path):
    _tree(tmp_path)
    assert jobs.upload_blocker(tmp_path / "data/train.jsonl", tmp_path, environ={}) is None
    assert "runs/" in jobs.upload_blocker(tmp_path / "runs/r1/metrics.jsonl", tmp_path, environ={})
    assert ".gitignore" in jobs.upload_blocker(tmp_path / "data/private/secret.jsonl", tmp_path, environ={})
    assert ".rayignore" in jobs.upload_blocker(tmp_path / "big.ckpt", tmp_path, environ={})
    # RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 makes Ray upload what .gitignore names.
    assert jobs.upload_blocker(tmp_path / "data/private/secret.jsonl", tmp_path,
                               environ={"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}) is None


def test_upload_blocker_agrees_with_rays_packaging(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "wd"
    root.mkdir()
    _tree(root)
    zip_path = tmp_path / "pkg.zip"
    _zip_files(str(root), list(jobs.DEFAULT_EXCLUDES), str(zip_path), include_gitignore=True)
    zipped = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
    every = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    predicted = {rel for rel in every if jobs.upload_blocker(root / rel, root, environ={}) is None}
    assert predicted == zipped
    assert "data/train.jsonl" in zipped and "runs/r1/metrics.jsonl" not in zipped


# ---------------------------------------------------------------------------------------------
# submit(): everything that can go wrong before the cluster is checked here


def _project(tmp_path: Path, data_path: str = "data/train.jsonl") -> Path:
    """A working dir with the tiny example config pointing at ``data_path``."""
    cfg = yaml.safe_load((REPO / "examples/grpo_tiny.yaml").read_text())
    cfg["data"]["path"] = data_path
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data/train.jsonl").write_text((REPO / "examples/data/letters_train.jsonl").read_text())
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def test_submit_builds_the_job(fake_cluster, tmp_path):
    client, seen = fake_cluster
    cfg = _project(tmp_path)
    job_id = jobs.submit(cfg, ["run.steps=2"], address="http://h:8265", working_dir=tmp_path,
                         env_vars={"X": "1"}, job_id="j-1", token="t")
    assert job_id == "j-1"
    assert seen == {"address": "http://h:8265", "token": "t"}
    (kw,) = client.submitted
    assert kw["entrypoint"] == "fleetrl train cfg.yaml run.steps=2"
    assert kw["submission_id"] == "j-1"
    assert kw["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert kw["runtime_env"]["env_vars"]["X"] == "1"
    assert kw["metadata"]["fleetrl.config"] == "cfg.yaml"
    assert kw["metadata"]["fleetrl.overrides"] == "run.steps=2"


def test_submit_a_command_instead_of_training(fake_cluster, tmp_path):
    client, _ = fake_cluster
    jobs.submit(command=["python", "-m", "x", "a b"], address="http://h:8265", working_dir=tmp_path)
    assert client.submitted[0]["entrypoint"] == "python -m x 'a b'"
    assert client.submitted[0]["submission_id"].startswith("fleetrl-job-")
    with pytest.raises(DeployError, match="not both"):
        jobs.submit(tmp_path / "c.yaml", command=["x"], working_dir=tmp_path)


def test_submit_rejects_a_bad_config_before_contacting_the_cluster(no_cluster, tmp_path):
    cfg = _project(tmp_path)
    with pytest.raises(DeployError, match=r"(?s)does not validate \(nothing was submitted\).*learner.lrr"):
        jobs.submit(cfg, ["learner.lrr=1"], working_dir=tmp_path)


def test_submit_rejects_data_the_cluster_will_not_have(no_cluster, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((REPO / "examples/data/letters_train.jsonl").read_text())
    wd = tmp_path / "wd"
    wd.mkdir()
    cfg = _project(wd, data_path=str(outside))
    with pytest.raises(DeployError, match=r"data.path=.*outside the working dir"):
        jobs.submit(cfg, working_dir=wd)
    cfg = _project(wd)
    (wd / ".gitignore").write_text("data/\n")
    with pytest.raises(DeployError, match=r"data.path=.*would not be uploaded.*\.gitignore"):
        jobs.submit(cfg, working_dir=wd)


def test_submit_rejects_an_excluded_config(no_cluster, tmp_path):
    (tmp_path / "runs").mkdir()
    cfg = tmp_path / "runs" / "cfg.yaml"
    cfg.write_text("algorithm: grpo\n")
    with pytest.raises(DeployError, match="would not be uploaded.*runs/"):
        jobs.submit(cfg, working_dir=tmp_path)


def test_explicit_address_beats_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    with jobs._address_env_cleared():
        import os

        assert "RAY_ADDRESS" not in os.environ  # Ray would otherwise prefer it over ours
    import os

    assert os.environ["RAY_ADDRESS"] == "http://env:8265"


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--address" in text
    assert len(text) > 300


def test_submit_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    text = capsys.readouterr().out
    for opt in ("--working-dir", "--pip", "--env", "--job-id", "--launcher", "--no-validate", "--wait",
                "--timeout", "RAY_AUTH_MODE=token"):
        assert opt in text


def test_cli_submit_passes_its_arguments(monkeypatch, capsys):
    calls = {}

    def fake_submit(config, overrides, **kw):
        calls.update(config=config, overrides=overrides, **kw)
        return "job-9"

    monkeypatch.setattr(jobs, "submit", fake_submit)
    monkeypatch.setenv("WANDB_API_KEY", "k")
    code = cli.main(["submit", "examples/grpo_tiny.yaml", "run.steps=2", "--address", "http://h:8265",
                     "--env", "A=1", "--env", "WANDB_API_KEY", "--pip", "reqs.txt", "--launcher", "python"])
    assert code == 0
    assert calls["config"] == "examples/grpo_tiny.yaml" and calls["overrides"] == ["run.steps=2"]
    assert calls["address"] == "http://h:8265"
    assert calls["env_vars"] == {"A": "1", "WANDB_API_KEY": "k"}
    assert calls["pip"] == "reqs.txt"  # one .txt: a requirements file
    assert calls["launcher"] == "python" and calls["validate"] is True
    assert "job-9" in capsys.readouterr().out


def test_cli_errors_exit_2_with_the_message(monkeypatch, capsys):
    for var in jobs.ADDRESS_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["jobs"]) == 2
    assert "http://HEAD:8265" in capsys.readouterr().err


def test_cli_status_exit_code_follows_the_job(monkeypatch, capsys):
    state = jobs.JobState("j", "FAILED", "boom", "fleetrl train c.yaml", 100.0, 160.0, 1)
    monkeypatch.setattr(jobs, "status", lambda job_id, address=None: state)
    assert cli.main(["status", "j"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "boom" in out and "1m00s" in out
    running = jobs.JobState("j", "RUNNING", "", "x", 1.0, None)
    monkeypatch.setattr(jobs, "status", lambda job_id, address=None: running)
    assert cli.main(["status", "j"]) == 0


def test_cli_import_is_light():
    code = ("import sys, fleetrl.deploy.cli; "
            "bad = [m for m in ('ray', 'fleetrl.run.config') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fleetrl_parser_has_the_deploy_commands():
    from fleetrl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(COMMANDS) <= set(sub.choices), sorted(sub.choices)


# ---------------------------------------------------------------------------------------------
# Manifests


def _load(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


def test_cluster_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("src/fleetrl/deploy/cluster.yaml")
    cfg = prepare_config(raw)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["rollout_gpu"]["resources"] == {ROLLOUT_RESOURCE: 1000}
    assert types["learner_gpu"]["resources"] == {LEARNER_RESOURCE: 1000}
    assert any("--metrics-export-port" in c for c in cfg["head_start_ray_commands"])


def test_cluster_launcher_validation_catches_a_typo():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("src/fleetrl/deploy/cluster.yaml")
    raw["available_node_types"]["rollout_gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def _groups(spec: dict) -> dict:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _custom_resources(group: dict) -> dict:
    # KubeRay's format: a JSON object, quoted, as a string.
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(spec)
    assert set(groups) == {"rollout", "learner"}
    assert _custom_resources(groups["rollout"]) == {ROLLOUT_RESOURCE: 1000}
    assert _custom_resources(groups["learner"]) == {LEARNER_RESOURCE: 1000}
    for name, group in [("head", head), *groups.items()]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), \
            f"{name}: rayStartParams values must be strings"
        assert params["metrics-export-port"] == "8080"
        pod = group["template"]
        assert pod["metadata"]["labels"]["fleetrl.io/role"] == name
        (container,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 8080} in [
            {"name": p["name"], "containerPort": p["containerPort"]} for p in container["ports"]]
        if name != "head":
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) > 0
            assert limits == container["resources"]["requests"]
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_raycluster():
    doc = _load("src/fleetrl/deploy/kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])
    assert doc["spec"]["enableInTreeAutoscaling"] is True


def test_kuberay_rayjob_runs_fleetrl_on_the_same_cluster():
    job = _load("src/fleetrl/deploy/kuberay/rayjob.yaml")
    cluster = _load("src/fleetrl/deploy/kuberay/raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert _groups(spec["rayClusterSpec"]) == _groups(cluster["spec"])  # one cluster shape, two files
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["fleetrl", "train"]
    assert (REPO / Path(argv[2]).relative_to("/app")).is_file()  # the image holds the repo at /app
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_kuberay_podmonitor_selects_every_fleetrl_pod():
    mon = _load("src/fleetrl/deploy/kuberay/monitoring.yaml")
    assert mon["kind"] == "PodMonitor"
    (expr,) = mon["spec"]["selector"]["matchExpressions"]
    assert expr == {"key": "fleetrl.io/role", "operator": "Exists"}
    assert mon["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_grafana_dashboard_queries_only_metrics_fleetrl_exports():
    from fleetrl.metrics.ray_metrics import COUNTED, DOCUMENTED, STEPS_COUNTER, metric_name

    exported = {"ray_" + metric_name(k) for k in DOCUMENTED}
    exported |= {"ray_" + metric_name(k) + "_total" for k in [*COUNTED, STEPS_COUNTER]}
    dash = json.loads((REPO / "src/fleetrl/deploy/grafana/fleetrl.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(next(v for v in dash["templating"]["list"] if v["name"] == "run")["definition"])
    used = {m for e in exprs for m in re.findall(r"\bray_fleetrl_[A-Za-z0-9_]+\b", e)}
    used.discard("ray_fleetrl_queue_depth_")  # the queue-depth family, matched by regex
    assert used and used <= exported, sorted(used - exported)
    assert all('run=~"$run"' in e for e in exprs[:-1])
    for name in ("ray_fleetrl_reward_mean", "ray_fleetrl_tokens_per_s", "ray_fleetrl_time_weight_sync",
                 "ray_fleetrl_weight_version", "ray_fleetrl_prompts_in_flight"):
        assert name in used


def test_cluster_doc_lists_every_documented_metric():
    from fleetrl.metrics.ray_metrics import COUNTED, DOCUMENTED, metric_name

    doc = (REPO / "docs/cluster.md").read_text()
    for key in DOCUMENTED:
        assert f"`ray_{metric_name(key)}`" in doc, key
    for key in COUNTED:
        assert f"`ray_{metric_name(key)}_total`" in doc, key
    for rel in ("src/fleetrl/deploy/cluster.yaml", "src/fleetrl/deploy/kuberay/raycluster.yaml",
                "src/fleetrl/deploy/kuberay/rayjob.yaml", "src/fleetrl/deploy/kuberay/monitoring.yaml",
                "src/fleetrl/deploy/grafana/fleetrl.json", "src/fleetrl/deploy/Dockerfile"):
        assert rel in doc and (REPO / rel).is_file(), rel


# ---------------------------------------------------------------------------------------------
# Closed by default (issue 11): credentials never uploaded, --env warned about, token auth on


CREDENTIAL_FILES = (".env", ".env.local", ".netrc", ".git-credentials", ".pypirc", ".aws/credentials",
                    ".ssh/id_ed25519", "keys/id_rsa", "keys/deploy.pem", "tls/server.key", ".kube/config",
                    ".config/gcloud/application_default_credentials.json", ".docker/config.json",
                    "sub/.env")


def _with_credentials(root: Path) -> None:
    for rel in CREDENTIAL_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("secret\n")


def test_credential_files_are_never_uploaded(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    root = tmp_path / "wd"
    root.mkdir()
    _tree(root)
    _with_credentials(root)
    for excludes in (jobs.DEFAULT_EXCLUDES, ["runs/"]):  # custom excludes cannot re-admit credentials
        env = jobs.build_runtime_env(root, excludes=excludes)
        zip_path = tmp_path / "pkg.zip"
        _zip_files(str(root), env["excludes"], str(zip_path), include_gitignore=True)
        zipped = {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}
        assert "data/train.jsonl" in zipped
        assert not zipped & set(CREDENTIAL_FILES), zipped & set(CREDENTIAL_FILES)
    for rel in CREDENTIAL_FILES:
        assert jobs.upload_blocker(root / rel, root, environ={}) is not None, rel


def test_excluded_credentials_lists_what_is_left_out(tmp_path):
    _with_credentials(tmp_path)
    (tmp_path / ".venv/lib").mkdir(parents=True)
    (tmp_path / ".venv/lib/site.pem").write_text("x")  # inside an excluded folder: not walked
    (tmp_path / "keyboard.py").write_text("")  # not a credential
    found = jobs.excluded_credentials(tmp_path)
    assert ".env" in found and ".netrc" in found and ".aws/" in found and ".ssh/" in found
    assert "keys/deploy.pem" in found and "keys/id_rsa" in found and "sub/.env" in found
    assert ".kube/" in found and ".docker/config.json" in found and ".config/gcloud/" in found
    assert not any(f.startswith(".venv") for f in found) and "keyboard.py" not in found


def test_submit_says_which_credentials_it_leaves_out_and_warns_about_env(fake_cluster, tmp_path):
    import io

    client, _ = fake_cluster
    cfg = _project(tmp_path)
    _with_credentials(tmp_path)
    out = io.StringIO()
    jobs.submit(cfg, [], address="http://h:8265", working_dir=tmp_path, env_vars={"WANDB_API_KEY": "k"},
                job_id="j", token="t", out=out)
    text = out.getvalue()
    line = next(x for x in text.splitlines() if "not uploading credential files" in x)
    for rel in (".env", ".netrc", ".aws/", ".ssh/", "keys/deploy.pem"):
        assert rel in line
    assert "--env WANDB_API_KEY" in text and "runtime_env" in text and "dashboard" in text
    assert "=k" not in text  # the value itself is never printed
    (kw,) = client.submitted
    assert set(jobs.CREDENTIAL_EXCLUDES) <= set(kw["runtime_env"]["excludes"])


def test_submit_is_quiet_without_credentials_or_env(fake_cluster, tmp_path):
    import io

    out = io.StringIO()
    jobs.submit(_project(tmp_path), [], address="http://h:8265", working_dir=tmp_path, job_id="j", token="t",
                out=out)
    assert "credential" not in out.getvalue() and "--env" not in out.getvalue()


def test_kuberay_manifests_enable_token_auth():
    for rel, spec_of in (("src/fleetrl/deploy/kuberay/raycluster.yaml", lambda d: d["spec"]),
                         ("src/fleetrl/deploy/kuberay/rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"])):
        spec = spec_of(_load(rel))
        assert spec["authOptions"] == {"mode": "token"}, rel
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", rel  # never exposed outside the cluster


def test_cluster_launcher_enables_token_auth_and_keeps_the_dashboard_on_loopback():
    raw = _load("src/fleetrl/deploy/cluster.yaml")
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, key
    head = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


# ---------------------------------------------------------------------------------------------
# Secrets never reach a job's entrypoint, metadata or `fleetrl status`


@pytest.mark.parametrize("override", [
    "run.storage_options.secret=abc123",
    "run.storage_options={key: AKIA1, secret: abc123}",
    "rollout.env_vars.HF_TOKEN=hf_abc",
    "run.wandb={project: p, api_key: wk-1}",
])
def test_submit_refuses_a_secret_override_and_says_to_use_a_reference(no_cluster, tmp_path, override):
    cfg = _project(tmp_path)
    key = override.partition("=")[0]
    with pytest.raises(DeployError, match=rf"override\(s\) {re.escape(key)} would put a secret in the job's "
                                          r"entrypoint.*\(nothing was submitted\).*\$\{env:MY_SECRET\}"):
        jobs.submit(cfg, ["run.steps=2", override], working_dir=tmp_path)


def test_submit_passes_references_and_plain_overrides(fake_cluster, tmp_path):
    client, _ = fake_cluster
    cfg = _project(tmp_path)
    jobs.submit(cfg, ["run.storage_options.secret=${env:S3_SECRET}", "rl.max_prompt_tokens=64",
                      "data.prompt_key=prompt"], address="http://h:8265", working_dir=tmp_path, job_id="j")
    (kw,) = client.submitted
    assert "'run.storage_options.secret=${env:S3_SECRET}'" in kw["entrypoint"]  # quoted: no shell expands it
    assert "rl.max_prompt_tokens=64" in kw["entrypoint"]


def test_status_and_metadata_show_secret_overrides_redacted():
    shown = jobs.redact_command("fleetrl train cfg.yaml run.storage_options.secret=abc rl.max_prompt_tokens=64 "
                                "'reward.functions.0.headers.Authorization=Bearer sk-1' "
                                "'reward.functions.0.url=https://u:pw@judge/s' "
                                "reward.functions.1.kwargs.answer_key=solution "
                                "rollout.env_vars.HF_TOKEN=hf_x 'run.storage_options.key=${env:K}'")
    for secret in ("abc", "sk-1", ":pw@", "hf_x"):
        assert secret not in shown, secret
    assert "rl.max_prompt_tokens=64" in shown and "kwargs.answer_key=solution" in shown  # not secrets
    assert "${env:K}" in shown

    class Info:
        submission_id, job_id, status, message, start_time, end_time = "j", None, "RUNNING", "", 0, 0
        entrypoint = "fleetrl train c.yaml run.storage_options.secret=abc"

    assert jobs._state(Info()).entrypoint == "fleetrl train c.yaml 'run.storage_options.secret=<redacted>'"


# ---------------------------------------------------------------------------------------------
# The manifests fail closed; the image holds no credentials


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("rel,path", [("src/fleetrl/deploy/kuberay/raycluster.yaml", ("spec",)),
                                      ("src/fleetrl/deploy/kuberay/rayjob.yaml", ("spec", "rayClusterSpec"))])
def test_kuberay_manifests_set_token_auth_explicitly_in_every_container(rel, path):
    spec = _load(rel)
    for key in path:
        spec = spec[key]
    assert spec["authOptions"] == {"mode": "token"}
    containers = _containers(spec)
    assert len(containers) == 3
    for name, container in containers:
        # Explicit: an operator too old for authOptions drops it silently; with this, Ray refuses to start
        # without a token instead of serving an open dashboard.
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"], name
    assert "KubeRay operator >= 1.5.1" in (REPO / rel).read_text()


def test_kuberay_network_policy_guards_every_head_port():
    policy = _load("src/fleetrl/deploy/kuberay/networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"fleetrl.io/role": "head"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    head = _load("src/fleetrl/deploy/kuberay/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    head_ports = {p["containerPort"] for p in head["containers"][0]["ports"]}
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules)  # no rule lets everyone in
    allowed = {p["port"] for rule in rules for p in rule["ports"]}
    assert head_ports == allowed == {6379, 8265, 10001, 8080}
    # Outside the cluster's own pods, only the Jobs API (submitters) and metrics (Prometheus) are reachable.
    for rule in rules[1:]:
        assert {p["port"] for p in rule["ports"]} <= {8265, 8080}


def test_dockerignore_keeps_every_credential_out_of_the_image():
    buildkit = (REPO / "src/fleetrl/deploy/Dockerfile.dockerignore").read_text().splitlines()
    classic = (REPO / ".dockerignore").read_text().splitlines()
    assert [line for line in classic if not line.startswith("#")] == \
        [line for line in buildkit if not line.startswith("#")]  # the two copies say the same
    patterns = {line.strip() for line in buildkit if line.strip() and not line.startswith("#")}
    for cred in jobs.CREDENTIAL_EXCLUDES:
        assert f"**/{cred.rstrip('/')}" in patterns, cred
    assert "COPY --chown=ray:users . /app" in (REPO / "src/fleetrl/deploy/Dockerfile").read_text()
