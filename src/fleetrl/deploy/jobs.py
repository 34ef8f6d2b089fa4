"""Run fleetrl on a Ray cluster through the Ray Jobs API, and follow what it does.

:func:`submit` uploads a working directory (your checkout, or a project with configs, data and
reward functions) and starts ``fleetrl train CONFIG [overrides]`` in it, as the job's driver on
the cluster's head node. :func:`status`, :func:`logs`, :func:`wait_for`, :func:`stop` and
:func:`list_jobs` talk to the same cluster. The address is the head's dashboard,
``http://HEAD:8265``: from the argument, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.

Ray 2.60 token authentication: a head whose ``ray start`` found a token (``~/.ray/auth_token``,
or ``RAY_AUTH_MODE=token``) refuses clients without it. With ``RAY_AUTH_MODE=token`` set here,
the token is read from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (print it on the head with ``ray get-auth-token``), and sent with every
request. Functions also take ``token=`` to pass one directly.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ADDRESS_HINT = "http://HEAD:8265"
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own precedence
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")

# Never worth uploading (gitignore-style patterns, matched from the working dir). Ray also
# honours .gitignore and .rayignore files in the working dir.
# Credentials never leave this machine, whatever .gitignore says: env files, netrc (W&B and Hugging
# Face logins live there), git/pip/docker/cloud/Kubernetes/SSH credentials, keys and certificates.
CREDENTIAL_EXCLUDES = (
    ".env", ".env.*", "*.env", ".envrc", ".netrc", "_netrc", ".git-credentials", ".pypirc", ".npmrc",
    ".docker/config.json", ".aws/", ".ssh/", ".gnupg/", ".kube/", "kubeconfig", ".config/gcloud/",
    ".azure/", ".ray/auth_token", "ray_auth_token", ".huggingface/token", ".cache/huggingface/token",
    ".config/wandb/", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx",
    "*.jks", "*.keystore", "credentials.json", "service-account*.json", "*-credentials.json", "secrets.yaml",
    "secrets.yml", "secrets.json", ".secrets/",
)
DEFAULT_EXCLUDES = (
    ".git/", ".venv/", "venv/", "runs/", "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/",
    ".mypy_cache/", "*.egg-info/", ".fleetrl-cache/", "wandb/", ".ipynb_checkpoints/",
    *CREDENTIAL_EXCLUDES,
)
# How the job starts fleetrl on the cluster.
LAUNCHERS = {
    # The installed console script; the uploaded working dir still wins on PYTHONPATH.
    "fleetrl": ["fleetrl"],
    # Only needs fleetrl's dependencies on the cluster: runs the uploaded code directly.
    "python": ["python", "-m", "fleetrl.cli"],
}


class DeployError(RuntimeError):
    """A cluster operation that cannot go ahead; the message says what to do."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    entrypoint: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    driver_exit_code: int | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATES

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


# ---------------------------------------------------------------------------------------------
# Pure pieces: address, token, runtime_env, entrypoint


def resolve_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard URL to talk to. No scheme means http; ``auto`` and ``ray://`` go to Ray as is."""
    env = os.environ if environ is None else environ
    if not address:
        address = next((env[v] for v in ADDRESS_ENV_VARS if env.get(v)), None)
    if not address:
        raise DeployError(
            "no Ray cluster address: pass --address (the head's dashboard, e.g. "
            f"{ADDRESS_HINT}) or export RAY_ADDRESS={ADDRESS_HINT}. A head started on this machine "
            "with `ray start --head` listens on http://127.0.0.1:8265"
        )
    address = address.strip().rstrip("/")
    if address == "auto" or "://" in address:
        return address
    return "http://" + address


def auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """The token to send when ``RAY_AUTH_MODE=token`` (the same sources Ray itself reads)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise DeployError(f"RAY_AUTH_TOKEN_PATH={path} is not a file: point it at the cluster's token file")
    else:
        path = (home or Path.home()) / ".ray" / "auth_token"
        if not path.is_file():
            raise DeployError(
                f"RAY_AUTH_MODE=token but there is no token: copy the head's token (run `ray get-auth-token` "
                f"on the head) into {path}, or export RAY_AUTH_TOKEN=<token>"
            )
    token = path.read_text().strip()
    if not token:
        raise DeployError(f"the token file {path} is empty: put the head's token in it (`ray get-auth-token`)")
    return token


def with_credential_excludes(excludes: Sequence[str]) -> list[str]:
    """``excludes`` plus every :data:`CREDENTIAL_EXCLUDES` pattern: custom excludes never re-admit credentials."""
    return [*excludes, *(p for p in CREDENTIAL_EXCLUDES if p not in excludes)]


def build_runtime_env(
    working_dir: str | Path,
    pip: Sequence[str] | str | None = None,
    env_vars: Mapping[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's ``runtime_env``: the working dir to upload (minus ``excludes``), optional pip
    packages (a list of requirement strings, or the path of a requirements file) and
    environment variables for the driver and every actor it starts. Credential files
    (:data:`CREDENTIAL_EXCLUDES`) are always excluded, whatever ``excludes`` says."""
    env = {"PYTHONUNBUFFERED": "1"}  # so `fleetrl logs --follow` sees lines as they are printed
    for key, value in (env_vars or {}).items():
        if not isinstance(value, str):
            raise DeployError(f"environment variable {key}: values must be strings, got {value!r}")
        env[key] = value
    excludes = with_credential_excludes(excludes)
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": excludes, "env_vars": env}
    if pip:
        if isinstance(pip, str):
            if not Path(pip).is_file():
                raise DeployError(f"pip requirements file {pip} does not exist")
            runtime_env["pip"] = str(Path(pip).resolve())
        else:
            runtime_env["pip"] = list(pip)
    return runtime_env


def parse_env_pairs(pairs: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` sets a value; a bare ``KEY`` copies it from this environment (keeps secrets
    such as WANDB_API_KEY out of the shell history)."""
    env = os.environ if environ is None else environ
    out = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise DeployError(f"--env {text!r}: expected KEY=VALUE or KEY (a variable name)")
        if not sep:
            if key not in env:
                raise DeployError(f"--env {key}: {key} is not set here; give a value with --env {key}=VALUE")
            value = env[key]
        out[key] = value
    return out


def train_command(config_path: str | Path, overrides: Sequence[str], working_dir: str | Path,
                  launcher: str = "fleetrl") -> list[str]:
    """``fleetrl train <config relative to working_dir> <overrides>`` (what the job runs)."""
    if launcher not in LAUNCHERS:
        raise DeployError(f"launcher {launcher!r}: expected one of {sorted(LAUNCHERS)}")
    rel = relative_config(config_path, working_dir)
    return [*LAUNCHERS[launcher], "train", rel, *overrides]


def relative_config(config_path: str | Path, working_dir: str | Path) -> str:
    wd = Path(working_dir).resolve()
    cfg = Path(config_path).resolve()
    if not cfg.is_file():
        hint = ""
        if not Path(config_path).is_absolute() and (wd / config_path).is_file():
            hint = (" (paths are relative to the current directory, not the working dir: "
                    f"did you mean {wd / config_path}?)")
        raise DeployError(f"config file not found: {config_path}{hint}")
    try:
        rel = cfg.relative_to(wd)
    except ValueError:
        raise DeployError(
            f"config {cfg} is outside the working dir {wd}, which is all that gets uploaded: run from a "
            "directory that contains it, pass --working-dir DIR with DIR above it, or copy it into the "
            "working dir"
        ) from None
    return rel.as_posix()


def upload_blocker(path: str | Path, working_dir: str | Path, excludes: Sequence[str] = DEFAULT_EXCLUDES,
                   environ: Mapping[str, str] | None = None) -> str | None:
    """Why ``path`` (inside ``working_dir``) would not be uploaded, or None if it would be.

    The same rules as Ray's packaging: ``excludes`` from the working dir, then each directory's
    ``.gitignore`` (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and ``.rayignore`` for what is below it.
    """
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's packaging uses

    env = os.environ if environ is None else environ
    wd = Path(working_dir).resolve()
    parts = Path(path).resolve().relative_to(wd).parts
    ignore_names = [".rayignore"]
    if env.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        ignore_names.insert(0, ".gitignore")
    for depth in range(1, len(parts) + 1):
        rel = "/".join(parts[:depth])
        for pattern in excludes:
            if PathSpec.from_lines("gitwildmatch", [pattern]).match_file(rel):
                return f"it matches the exclude pattern {pattern!r}"
        for above in range(depth):
            folder = wd.joinpath(*parts[:above])
            for name in ignore_names:
                ignore_file = folder / name
                if ignore_file.is_file():
                    spec = PathSpec.from_lines("gitwildmatch", ignore_file.read_text().splitlines())
                    if spec.match_file("/".join(parts[above:depth])):
                        return f"{ignore_file} ignores it"
    return None


def excluded_credentials(working_dir: str | Path, excludes: Sequence[str] = DEFAULT_EXCLUDES,
                         limit: int = 10_000) -> list[str]:
    """Paths (relative, posix) under ``working_dir`` that match :data:`CREDENTIAL_EXCLUDES` and that
    ``excludes`` leave out: what ``submit`` announces before uploading. Excluded folders are not
    walked into (a .venv holds thousands of files); at most ``limit`` entries are looked at."""
    from ray._private.thirdparty.pathspec import PathSpec

    wd = Path(working_dir).resolve()
    creds = PathSpec.from_lines("gitwildmatch", CREDENTIAL_EXCLUDES)
    skip = PathSpec.from_lines("gitwildmatch", [p for p in excludes if p not in CREDENTIAL_EXCLUDES])
    found: list[str] = []
    seen = 0
    for root, dirs, files in os.walk(wd):
        rel_root = Path(root).relative_to(wd)
        kept = []
        for d in sorted(dirs):
            rel = (rel_root / d).as_posix()
            if creds.match_file(rel + "/"):
                found.append(rel + "/")
            elif not skip.match_file(rel + "/") and not Path(root, d).is_symlink():
                kept.append(d)
        dirs[:] = kept
        for f in sorted(files):
            seen += 1
            rel = (rel_root / f).as_posix()
            if creds.match_file(rel):
                found.append(rel)
        if seen > limit:
            break
    return sorted(found)


def env_vars_warning(env_vars: Mapping[str, str] | None) -> str | None:
    """What to tell the user about ``--env`` values: they are stored in the job's runtime env."""
    if not env_vars:
        return None
    return (f"--env {', '.join(sorted(env_vars))}: the values are stored in the job's runtime_env, which "
            "anyone who can reach the dashboard or the Jobs API can read; prefer secrets the cluster "
            "already holds (a Kubernetes Secret, the nodes' environment)")


def _schema_field_names() -> set[str]:
    """Every field name of the run config's models (``prompt_key``, ``max_prompt_tokens``...): names
    that only look secret."""
    import typing

    from pydantic import BaseModel

    from fleetrl.run.config import RunConfig

    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(name)
            stack = [field.annotation]
            while stack:
                ann = stack.pop()
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    walk(ann)
                stack.extend(typing.get_args(ann))

    walk(RunConfig)
    return names


def _secret_looking(key: str, value: str, schema: set[str]) -> bool:
    """Whether ``key=value`` (an override as typed) carries a secret: an HTTP header, a key named like a
    secret that is not a schema field (storage_options.secret, env_vars.HF_TOKEN), a URL password, or a
    mapping holding one of those; ``${env:NAME}`` references are not secrets."""
    import yaml

    from fleetrl.core.secrets import has_env_ref
    from fleetrl.run.config import REDACTED, _redact_free_form, looks_secret

    if not value or has_env_ref(value):
        return False
    parts = key.split(".")
    if "headers" in parts[:-1] or (looks_secret(parts[-1]) and parts[-1] not in schema):
        return True
    if re.search(r"://[^/@:\s]*:[^/@\s]+@", value):
        return True
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    if isinstance(parsed, (dict, list)):
        if "headers" in json.dumps(parsed):
            return True
        return REDACTED in json.dumps(_redact_free_form(parsed))
    return False


def redact_command(command: str) -> str:
    """A job's entrypoint (or overrides) as shown by `fleetrl status` / `fleetrl list`: the value of
    every secret-looking ``key=value`` word replaced by <redacted>, passwords in URLs too."""
    from fleetrl.run.config import REDACTED, _redact_url

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    schema = _schema_field_names()
    out = []
    for word in words:
        key, sep, value = word.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_.]+", key) and _secret_looking(key, value, schema):
            word = f"{key}={REDACTED}"
        out.append(_redact_url(word))
    return shlex.join(out)


def secret_overrides(config_path: str | Path, overrides: Sequence[str]) -> list[str]:
    """The overrides that would put a secret in the job's entrypoint: those whose value the config's own
    redaction hides (HTTP headers, storage_options keys, tokens in env vars...), unless written as
    ``${env:NAME}`` references."""
    from fleetrl.run.config import REDACTED, ConfigError, load_config, parse_override, redacted_config

    try:
        tree = redacted_config(load_config(config_path, list(overrides)))
    except ConfigError:
        return []
    found = []
    for text in overrides:
        node: Any = tree
        for k in parse_override(text)[0]:
            node = node[int(k)] if isinstance(node, list) and k.isdigit() and int(k) < len(node) else \
                node.get(k) if isinstance(node, dict) else None
        if REDACTED in json.dumps(node):
            found.append(text.partition("=")[0])
    return found


def default_job_id(config_path: str | Path | None) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", Path(config_path).stem.lower()).strip("-") if config_path else "job"
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"fleetrl-{stem or 'job'}-{stamp}-{secrets.token_hex(2)}"


def check_config(config_path: str | Path, overrides: Sequence[str], working_dir: str | Path,
                 excludes: Sequence[str] = DEFAULT_EXCLUDES) -> None:
    """Validate the config here, before uploading anything, and check that the local files it
    names travel with the working dir."""
    from fleetrl.run.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as e:
        raise DeployError(f"{config_path} does not validate (nothing was submitted): {e}") from None
    wd = Path(working_dir).resolve()
    paths = []
    for section in ("data", "eval_data"):
        node = getattr(cfg, section, None)
        for attr in ("path", "eval_path"):
            value = getattr(node, attr, None) if node is not None else None
            if isinstance(value, str) and value:
                paths.append((f"{section}.{attr}", value))
    model_path = getattr(getattr(cfg, "model", None), "path", None)
    from fleetrl.run.runtime import builtin_model_names

    if isinstance(model_path, str) and model_path not in builtin_model_names():
        paths.append(("model.path", model_path))
    for field, value in paths:
        # Relative paths left after loading are relative to the CWD, which on the cluster is the working dir.
        local = Path(value) if Path(value).is_absolute() else wd / value
        if not local.exists():
            continue  # a path on the cluster (or a hub id): nothing to check here
        local = local.resolve()
        try:
            local.relative_to(wd)
        except ValueError:
            raise DeployError(
                f"{field}={value} is outside the working dir {wd} and will not exist on the cluster: move it "
                "into the working dir, or point the config at storage the cluster can read"
            ) from None
        why = upload_blocker(local, wd, excludes)
        if why:
            raise DeployError(f"{field}={value} would not be uploaded ({why}): the job would not find it")


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray lets RAY_ADDRESS override an explicit address; the address given here must win."""
    saved = {v: os.environ.pop(v) for v in ADDRESS_ENV_VARS if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_hint(url: str) -> str:
    return (
        f"the cluster at {url} uses token authentication: export RAY_AUTH_MODE=token and make the head's "
        "token available here (on the head: `ray get-auth-token`; here: ~/.ray/auth_token, RAY_AUTH_TOKEN "
        "or RAY_AUTH_TOKEN_PATH)"
    )


def _translate(err: Exception, url: str, job_id: str | None = None) -> DeployError | None:
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        if "invalid" in str(err).lower() or "Forbidden" in str(err):
            return DeployError(f"the token was refused by {url}: it is not this cluster's token. " + _auth_hint(url))
        return DeployError(_auth_hint(url))
    if isinstance(err, ConnectionError) or type(err).__name__ in ("ConnectionError", "ConnectTimeout"):
        return DeployError(
            f"cannot reach the Ray dashboard at {url}: is the head running (`ray status` on it) and its "
            "dashboard port reachable from here (8265 by default, not the GCS port 6379)? Through SSH: "
            "`ray dashboard src/fleetrl/deploy/cluster.yaml` or `ssh -L 8265:localhost:8265 HEAD`; on Kubernetes: "
            "`kubectl port-forward svc/fleetrl-head-svc 8265:8265`"
        )
    if job_id and isinstance(err, RuntimeError) and "404" in str(err):
        return DeployError(f"no job {job_id!r} on {url}: `fleetrl jobs` lists the cluster's jobs")
    return None


class _Cluster:
    """A JobSubmissionClient whose errors say what to do."""

    def __init__(self, address: str | None, token: str | None):
        self.url = resolve_address(address)
        self.token = token if token is not None else auth_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        from ray.job_submission import JobSubmissionClient

        with self.call(), _address_env_cleared():
            self.client = JobSubmissionClient(self.url, headers=headers)

    @contextmanager
    def call(self, job_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except DeployError:
            raise
        except Exception as e:  # translated when we know what to say, else re-raised as is
            mapped = _translate(e, getattr(self, "url", "?"), job_id)
            if mapped is None:
                raise
            raise mapped from e


def _state(info) -> JobState:
    def secs(ms):
        return ms / 1000.0 if ms else None

    return JobState(
        job_id=info.submission_id or info.job_id or "?",
        status=str(info.status),
        message=info.message or "",
        entrypoint=redact_command(info.entrypoint or ""),
        start_time=secs(info.start_time),
        end_time=secs(info.end_time),
        driver_exit_code=getattr(info, "driver_exit_code", None),
    )


def submit(
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    address: str | None = None,
    working_dir: str | Path | None = None,
    pip: Sequence[str] | str | None = None,
    env_vars: Mapping[str, str] | None = None,
    job_id: str | None = None,
    wait: bool = False,
    *,
    command: Sequence[str] | None = None,
    validate: bool = True,
    launcher: str = "fleetrl",
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    token: str | None = None,
    timeout_s: float | None = None,
    out: IO[str] | None = None,
) -> str:
    """Submit ``fleetrl train CONFIG OVERRIDES`` as a Ray job; returns the job id.

    ``working_dir`` (default: the current directory) is uploaded and is the job's current
    directory; the config must be inside it. ``command`` runs another command instead of
    training (a list of arguments, e.g. a smoke test). ``validate`` loads the config here first,
    so a bad config fails before anything is uploaded. With ``wait``, the job's logs stream to
    ``out`` until it ends (raising DeployError after ``timeout_s``); check :func:`status` after.
    """
    wd = Path(working_dir or os.getcwd()).resolve()
    if not wd.is_dir():
        raise DeployError(f"working dir {wd} is not a directory")
    if (config_path is None) == (command is None):
        raise DeployError("submit needs either a config file or a command (not both)")
    metadata = {"fleetrl.working_dir": str(wd)}
    if command is None:
        argv = train_command(config_path, overrides, wd, launcher)
        rel = relative_config(config_path, wd)
        why = upload_blocker(wd / rel, wd, excludes)
        if why:
            raise DeployError(f"config {rel} would not be uploaded ({why}): move it or change the excludes")
        if validate:
            check_config(wd / rel, overrides, wd, excludes)
        secret = secret_overrides(wd / rel, overrides)
        if secret:
            raise DeployError(
                f"override(s) {', '.join(secret)} would put a secret in the job's entrypoint and metadata, which "
                "the dashboard, the Jobs API, `fleetrl status` and `ps` on the head show (nothing was submitted). "
                "Write the value as a reference instead, e.g. "
                f"'{secret[0]}=${{env:MY_SECRET}}', and set MY_SECRET where the run's services run (on "
                "Kubernetes: the pods' env, from a Secret): it is read there and never passes a command line")
        metadata.update({"fleetrl.config": rel, "fleetrl.overrides": redact_command(shlex.join(overrides))})
    else:
        argv = list(command)
        if not argv:
            raise DeployError("submit: the command is empty")
    runtime_env = build_runtime_env(wd, pip=pip, env_vars=env_vars, excludes=excludes)
    job_id = job_id or default_job_id(config_path)
    say = out or sys.stdout
    left_out = excluded_credentials(wd, runtime_env["excludes"])
    if left_out:
        shown = ", ".join(left_out[:12]) + (f" and {len(left_out) - 12} more" if len(left_out) > 12 else "")
        print(f"fleetrl: not uploading credential files from {wd}: {shown}", file=say, flush=True)
    warning = env_vars_warning(env_vars)
    if warning:
        print(f"fleetrl: warning: {warning}", file=say, flush=True)

    cluster = _Cluster(address, token)
    with cluster.call():
        submitted = cluster.client.submit_job(
            entrypoint=shlex.join(argv), submission_id=job_id, runtime_env=runtime_env, metadata=metadata
        )
    if wait:
        wait_for(submitted, address=address, timeout_s=timeout_s, follow=True, out=out, token=token)
    return submitted


def status(job_id: str, address: str | None = None, *, token: str | None = None) -> JobState:
    cluster = _Cluster(address, token)
    with cluster.call(job_id):
        return _state(cluster.client.get_job_info(job_id))


def list_jobs(address: str | None = None, *, token: str | None = None) -> list[JobState]:
    """Every job the cluster knows, oldest first."""
    cluster = _Cluster(address, token)
    with cluster.call():
        jobs = [_state(j) for j in cluster.client.list_jobs()]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def logs(job_id: str, address: str | None = None, follow: bool = False, *, out: IO[str] | None = None,
         timeout_s: float | None = None, token: str | None = None) -> str:
    """The job's output so far. With ``follow``, stream it to ``out`` (default stdout) until the
    job ends (DeployError after ``timeout_s``) and return what was streamed."""
    cluster = _Cluster(address, token)
    if not follow:
        with cluster.call(job_id):
            return cluster.client.get_job_logs(job_id)
    out = out or sys.stdout
    seen: list[str] = []

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            seen.append(chunk)
            out.write(chunk)
            out.flush()

    with cluster.call(job_id):
        try:
            asyncio.run(asyncio.wait_for(tail(), timeout_s))
        except TimeoutError:
            raise _still_running(job_id, "RUNNING", timeout_s) from None
    return "".join(seen)


def _still_running(job_id: str, state: str, timeout_s: float | None) -> DeployError:
    return DeployError(
        f"job {job_id} is still {state} after {timeout_s:.0f} s; it keeps running "
        f"(`fleetrl logs {job_id} --follow` to watch, `fleetrl stop {job_id}` to end it)"
    )


def wait_for(job_id: str, address: str | None = None, timeout_s: float | None = None, *, follow: bool = False,
             out: IO[str] | None = None, poll_s: float = 1.0, token: str | None = None) -> JobState:
    """Block until the job ends (streaming its logs with ``follow``); returns its final state."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if follow:
        logs(job_id, address, follow=True, out=out, timeout_s=timeout_s, token=token)  # ends with the job
    while True:
        state = status(job_id, address, token=token)
        if state.done:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise _still_running(job_id, state.status, timeout_s)
        time.sleep(poll_s)


def stop(job_id: str, address: str | None = None, *, token: str | None = None) -> bool:
    """Ask the cluster to stop the job (SIGTERM to its driver, then SIGKILL); False if it had ended."""
    cluster = _Cluster(address, token)
    with cluster.call(job_id):
        return bool(cluster.client.stop_job(job_id))
