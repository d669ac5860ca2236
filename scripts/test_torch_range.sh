#!/usr/bin/env bash
# The torch range the README claims, tested: besides the default 2.13.0 (scripts/test.sh), the floor
# (2.8.0) and the newest torch the registry serves (2.14.1), each a CUDA build run on CPU in its own
# virtual environment, on the whole suite with every extra (DeepSpeed, W&B, video decoding).
#
# Disk: such an environment holds about 7.5 GB (4.1 GB of NVIDIA libraries); installing it took 8.5 GB
# at its peak (measured: free space from 15 GB down to 6.5 GB). One version at a time: the environment is made with no pip cache, tested,
# and removed (KEEP_RANGE_VENVS=1 keeps it). A version whose environment does not exist yet and for
# which the disk has less than RANGE_DISK_GB (10) free is not tested: the script says so, loudly, in
# its last lines, and goes on (the README's test command, scripts/test.sh, has already passed).
# TORCH_RANGE="2.8.0 2.14.1" by default; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
need_gb="${RANGE_DISK_GB:-10}"
tested=()
untested=()
for version in ${TORCH_RANGE:-2.8.0 2.14.1}; do
    venv=".venv-torch$version"
    if [ ! -x "$venv/bin/python" ]; then
        free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
        if [ "$free_gb" -lt "$need_gb" ]; then
            untested+=("$version (${free_gb} GB free on $(pwd), its environment needs ${need_gb} GB)")
            continue
        fi
    fi
    PIP_NO_CACHE_DIR=1 NONLOCAL_VENV="$venv" TORCH_VERSION="$version" \
        bash scripts/setup_env.sh "dev,deepspeed,wandb,train,video,diffusers"
    "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" \
        || { echo "$venv holds torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), not $version" >&2; exit 1; }
    echo "== torch $version =="
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
    tested+=("$version")
    if [ "${KEEP_RANGE_VENVS:-0}" != 1 ]; then
        rm -rf "$venv"
    fi
done
echo "== torch range: tested ${tested[*]:-none} =="
for line in "${untested[@]+"${untested[@]}"}"; do
    echo "== torch range: NOT TESTED: torch $line ==" >&2
done
