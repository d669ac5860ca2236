#!/usr/bin/env bash
# The torch range the README claims, tested: besides the default 2.13.0 (scripts/test.sh), the newest
# torch the registry serves (a CUDA build, run on CPU) in its own virtual environment, on the core
# suites (kernels, functional, block, sharded activations and networks); the integrations
# (DeepSpeed, W&B, video) are tested on 2.13.0. TORCH_RANGE="2.14.1" by default; TORCH_RANGE=2.3.1
# shows the intermittent multi-rank hangs that keep torch < 2.13 out of the claimed range.
set -euo pipefail
cd "$(dirname "$0")/.."
for version in ${TORCH_RANGE:-2.14.1}; do
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
