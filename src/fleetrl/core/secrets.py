"""Secrets by reference: ``${env:NAME}`` in a config value is read from the environment of the
process that uses it (the reward actor for HTTP headers, the driver and every learner rank for
``run.storage_options``), so the secret itself never passes through a config file, a command line,
a job's entrypoint or a saved config.yaml. On a cluster, set NAME in the pods' environment (e.g. from
a Kubernetes Secret). Values holding only references are shown as written (no secret is in them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


class SecretRefError(ValueError):
    """A ``${env:NAME}`` reference whose variable is not set where it is used."""


def has_env_ref(value: Any) -> bool:
    return isinstance(value, str) and ENV_REF.search(value) is not None


def resolve_env_refs(value: Any, where: str, environ: Mapping[str, str] | None = None) -> Any:
    """``value`` (a string, or dicts/lists of them) with every ``${env:NAME}`` replaced by NAME's value;
    SecretRefError naming ``where`` and NAME when it is not set."""
    env = os.environ if environ is None else environ
    if isinstance(value, dict):
        return {k: resolve_env_refs(v, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env_refs(v, f"{where}.{i}", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${env:" not in value:
        return value

    def one(m: re.Match) -> str:
        name = m.group(1)
        if name not in env:
            raise SecretRefError(
                f"{where} refers to ${{env:{name}}} but {name} is not set in the environment of this process "
                f"(pid {os.getpid()}): set it where this service runs (on Kubernetes: the pod's env, e.g. from "
                "a Secret; with `fleetrl submit`: the cluster's nodes)")
        return env[name]

    return ENV_REF.sub(one, value)
