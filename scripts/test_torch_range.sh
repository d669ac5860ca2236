#!/usr/bin/env bash
# The torch range the README claims, tested: besides the default 2.13.0 (scripts/test.sh), the floor
# (2.8.0) and the newest torch the registry serves (2.14.1), each a CUDA build run on CPU in its own
# virtual environment, on the whole suite with every extra (DeepSpeed, W&B, video decoding).
# TORCH_RANGE="2.8.0 2.14.1" by default; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
for version in ${TORCH_RANGE:-2.8.0 2.14.1}; do
    venv=".venv-torch$version"
    NONLOCAL_VENV="$venv" TORCH_VERSION="$version" bash scripts/setup_env.sh "dev,deepspeed,wandb,train,video"
    "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" \
        || { echo "$venv holds torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), not $version" >&2; exit 1; }
    echo "== torch $version =="
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
done
