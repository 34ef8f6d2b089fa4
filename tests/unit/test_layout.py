"""The package's shape: one top-level package in the wheel, light imports, the dependency rules.

Fast and without Ray: the wheel is built once per module straight from the setuptools backend
(no pip, no index, no build isolation), imports are checked in fresh interpreters, and the import
graph is read from the source with `ast` (every import, function-local ones included).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PKG = SRC / "fleetrl"
SERVICES = ("rollout", "reward", "learner")
# The orchestrator's parts: they may import the services, never the other way round.
ORCHESTRATOR = ("online", "offline", "run", "cli", "train")


# ------------------------------------------------------------------------------------------ the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Build the wheel from a copy of what it is made of (stale build/ or egg-info never leak in)."""
    import setuptools

    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.fail(f"building the wheel needs setuptools>=77 (pyproject's build-system); this environment "
                    f"has {setuptools.__version__}: pip install -c constraints.txt 'setuptools>=77'")
    tmp = tmp_path_factory.mktemp("wheel")
    tree, out = tmp / "tree", tmp / "dist"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tree, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "deprecated" not in proc.stderr.lower(), \
        f"the build warns about deprecated metadata:\n{proc.stderr}"
    return zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1])


def test_wheel_has_one_top_level_package_fleetrl(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    extra = sorted(top - dist_info - {"fleetrl"})
    assert "fleetrl" in top and not extra, f"the wheel installs more than `fleetrl`: {extra}"
    assert len(dist_info) == 1
    entry_points = wheel.read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "fleetrl = fleetrl.cli:main" in entry_points


def test_wheel_metadata_license_is_spdx_with_the_license_file(wheel):
    dist_info = next(n.split("/")[0] for n in wheel.namelist() if ".dist-info/" in n)
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert f"{dist_info}/licenses/LICENSE" in wheel.namelist()


def test_wheel_ships_the_deploy_assets(wheel):
    """Every non-Python file under src/fleetrl/deploy (Dockerfile, KubeRay, Grafana, cluster YAML)."""
    deploy = PKG / "deploy"
    assets = {p.relative_to(SRC).as_posix() for p in deploy.rglob("*")
              if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert {"fleetrl/deploy/Dockerfile", "fleetrl/deploy/cluster.yaml"} <= assets
    assert any(a.startswith("fleetrl/deploy/kuberay/") for a in assets)
    assert any(a.startswith("fleetrl/deploy/grafana/") for a in assets)
    missing = assets - set(wheel.namelist())
    assert not missing, \
        f"deploy assets missing from the wheel (pyproject [tool.setuptools.package-data]): {missing}"


# ------------------------------------------------------------------------------------ light imports


def _modules_after(code: str) -> set[str]:
    """Top-level names in sys.modules after running `code` in a fresh interpreter."""
    probe = code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"`{code}` failed:\n{proc.stderr[-3000:]}"
    return set(proc.stdout.split())


def test_the_pure_algorithms_import_torch_but_no_ray_vllm_deepspeed_or_transformers():
    heavy = _modules_after("import fleetrl.algos") & {"ray", "vllm", "deepspeed", "transformers"}
    assert not heavy, f"`import fleetrl.algos` imports {sorted(heavy)}; the algorithms must need torch only"


def test_loading_and_validating_a_config_imports_no_ray_or_vllm():
    code = ("from fleetrl.run.config import load_config\n"
            f"cfg = load_config({str(REPO / 'examples' / 'grpo_tiny.yaml')!r})\n"
            "assert cfg is not None")
    heavy = _modules_after(code) & {"ray", "vllm"}
    assert not heavy, f"loading examples/grpo_tiny.yaml imports {sorted(heavy)}; config validation must not"


# -------------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every `fleetrl...` module `path` imports (absolute or relative, at any depth), with its line."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from fleetrl import algos` / `from . import x`: the names may be modules themselves.
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "fleetrl" or name.startswith("fleetrl.")]


def _node(module: str) -> str | None:
    """The folder (subpackage) or top-level module of `fleetrl.<...>` that `module` belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    first = parts[1]
    if (PKG / first).is_dir() or (PKG / f"{first}.py").is_file():
        return first
    return None  # a name imported from a module, not a module (e.g. `from fleetrl.x import y`)


def _graph() -> dict[str, dict[str, tuple[str, int]]]:
    """node -> {node it imports: (file, line) of the first such import}."""
    edges: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for path in sorted(PKG.rglob("*.py")):
        src = _node(_module_name(path))
        for name, line in _imports(path):
            dst = _node(name)
            if dst is not None and dst != src and src is not None:
                edges[src].setdefault(dst, (path.relative_to(REPO).as_posix(), line))
    return edges


def test_the_services_never_import_each_other_or_the_orchestrator():
    edges = _graph()
    bad = [f"{src} -> {dst} ({file}:{line})"
           for src in SERVICES for dst, (file, line) in sorted(edges[src].items())
           if dst in SERVICES or dst in ORCHESTRATOR]
    assert not bad, ("rollout, reward and learner must not import each other or the orchestrator "
                     "(ARCHITECTURE.md rule 1); move what they share to fleetrl.core:\n  " + "\n  ".join(bad))


def _find_cycle(edges: dict[str, dict[str, tuple[str, int]]]) -> list[str] | None:
    """One cycle of the graph as a node path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_between_folders():
    edges = _graph()
    cycle = _find_cycle(edges)
    if cycle:
        steps = [f"{a} -> {b} ({edges[a][b][0]}:{edges[a][b][1]})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle between folders of fleetrl (function-local imports count):\n  "
                    + "\n  ".join(steps))


def test_the_cycle_finder_reports_a_cycle():
    triangle = {"a": {"b": ("f", 1)}, "b": {"c": ("f", 2)}, "c": {"a": ("f", 3)}}
    assert _find_cycle(triangle) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": ("f", 1)}, "b": {}}) is None
