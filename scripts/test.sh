#!/usr/bin/env bash
# Fresh machine -> installed environment -> the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "dev,deepspeed,wandb,train,video,diffusers"
exec .venv/bin/python -m pytest tests -q "$@"
