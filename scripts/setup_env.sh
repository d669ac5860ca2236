#!/usr/bin/env bash
# Creates (or reuses) .venv and installs torch 2.13.0 first, then this package with the given extras.
# Usage: bash scripts/setup_env.sh EXTRAS   (e.g. "dev,deepspeed,wandb,train,video,diffusers")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${NONLOCAL_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
# torch first: a bare torch requirement on an empty environment would pull a multi-GB CUDA build.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
"$py" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
echo "environment ready: $venv (extras: $extras)"
