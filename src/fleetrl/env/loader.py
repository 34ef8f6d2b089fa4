"""Load a user's environment class from ``path/to/env.py:ClassName`` or ``package.module:ClassName``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path


class EnvLoadError(ValueError):
    """``rollout.environment`` does not name a usable environment class."""


def _module_from_file(path: Path, spec: str):
    name = "fleetrl_env_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise EnvLoadError(f"rollout.environment {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise EnvLoadError(f"rollout.environment {spec!r}: importing {path} raised {type(e).__name__}: {e}") from e
    sys.modules[name] = module
    return module


def resolve_environment(spec: str, base_dir: str | Path | None = None,
                        env_kwargs: dict | None = None) -> str:
    """``spec`` with a file path made absolute (for processes with another working directory),
    after checking that it loads and that ``cls(**env_kwargs)`` builds."""
    cls = load_environment(spec, base_dir)
    try:
        cls(**(env_kwargs or {}))
    except Exception as e:
        raise EnvLoadError(f"rollout.environment {spec!r} with rollout.episode.env_kwargs={env_kwargs or {}}: "
                           f"building it raised {type(e).__name__}: {e}") from e
    where, _, cls_name = spec.rpartition(":")
    if not where.endswith(".py") or Path(where).expanduser().is_absolute():
        return spec
    path = next(Path(d) / where for d in (base_dir, Path.cwd()) if d and (Path(d) / where).is_file())
    return f"{path.resolve()}:{cls_name}"


def load_environment(spec: str, base_dir: str | Path | None = None) -> type:
    """The class named by ``spec``. A part before ':' ending in .py is a file (absolute, else under
    ``base_dir``, else under the current directory); otherwise an importable module."""
    where, sep, cls_name = spec.rpartition(":")
    if not sep or not where or not cls_name:
        raise EnvLoadError(
            f"rollout.environment {spec!r} must look like 'path/to/env.py:ClassName' or 'package.module:ClassName'")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        candidates = [path] if path.is_absolute() else [Path(d) / path for d in (base_dir, Path.cwd()) if d]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            tried = ", ".join(str(c) for c in candidates)
            raise EnvLoadError(f"rollout.environment {spec!r}: file not found (tried {tried}); paths are "
                               "relative to the config file's directory, else to the current directory")
        module = _module_from_file(found, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise EnvLoadError(f"rollout.environment {spec!r}: cannot import module {where!r}: {e}") from e
    from fleetrl.env.base import Environment

    cls = getattr(module, cls_name, None)
    if cls is None:
        raise EnvLoadError(f"rollout.environment {spec!r}: {where} has no class {cls_name!r}")
    if not isinstance(cls, type):
        raise EnvLoadError(f"rollout.environment {spec!r}: {cls_name} in {where} is a {type(cls).__name__}, "
                           "not a class; name a subclass of fleetrl.env.Environment")
    if not issubclass(cls, Environment):
        no_step = "" if callable(getattr(cls, "step", None)) else "has no step(text) method and "
        raise EnvLoadError(f"rollout.environment {spec!r}: {cls_name} {no_step}is not a fleetrl.env.Environment: "
                           "subclass it (from fleetrl.env import Environment) and implement step(text)")
    return cls
