#!/usr/bin/env bash
# The torch range the README claims, tested: the oldest and the newest torch the registry serves
# (CUDA builds, run on CPU), each in its own virtual environment, on the core suites (kernels,
# functional, block, sharded activations and networks); the integrations (DeepSpeed, W&B, video)
# are tested on the default torch by scripts/test.sh. TORCH_RANGE="2.3.1 2.14.1" by default.
set -euo pipefail
cd "$(dirname "$0")/.."
for version in ${TORCH_RANGE:-2.3.1 2.14.1}; do
    venv=".venv-torch$version"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        case "$version" in 2.3.*) "$venv/bin/pip" install -q --disable-pip-version-check "numpy<2" ;; esac
    fi
    NONLOCAL_VENV="$venv" TORCH_VERSION="$version" bash scripts/setup_env.sh dev
    echo "== torch $version =="
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/kernels tests/test_functional.py tests/test_block.py \
        tests/test_edges.py tests/test_mixed_precision.py tests/parallel/test_strategy_backends.py \
        tests/parallel/test_parallel_block.py tests/parallel/test_networks.py tests/parallel/test_resize.py "$@"
done
