#!/usr/bin/env bash
# Fresh machine -> installed environment -> a short demonstration of the non-local block on a video.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "dev"
exec .venv/bin/python scripts/demo.py "$@"
