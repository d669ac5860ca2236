#!/usr/bin/env bash
# One GPU check in one command (issue 10): on a machine with one GPU, torch preinstalled and no
# network, install what is missing from a folder of wheels, then run the CUDA tests, the GPU
# benchmark (scripts/benchmark.py --device cuda) and scripts/train.py on one GPU (ZeRO-2, one rank),
# and print their tables. Every stage has a time limit; the whole check fits in 8 minutes.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash scripts/gpu_check.sh WHEEL_DIR [options]

  WHEEL_DIR          folder of wheels for the packages torch's environment lacks (deepspeed, hjson,
                     pydantic, einops, scikit-learn, pytest, ...; an xformers wheel is optional and
                     is installed without its dependencies, so torch is never replaced)
  --python PY        interpreter with torch and CUDA (default: python3)
  --out DIR          where logs, the benchmark JSON and the training run go (default: gpu_check_out)
  --steps N          training steps of scripts/train.py (default: 200)
  --dry-run          print every command instead of running it
  -h, --help         this text

Stages and limits (470 s in all): install 60 s, CUDA tests 150 s, benchmark 150 s, training 110 s.
Exit status: 0 when every stage passed, 1 otherwise (the summary names the stages that failed).
EOF
}

wheels="" py="python3" out="gpu_check_out" steps=200 dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python) py="${2:?--python needs a value}"; shift 2 ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --steps) steps="${2:?--steps needs a value}"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) if [ -n "$wheels" ]; then echo "gpu_check.sh: one WHEEL_DIR, given '$wheels' and '$1'" >&2; exit 2; fi
           wheels="$1"; shift ;;
    esac
done
if [ -z "$wheels" ]; then usage >&2; exit 2; fi
if [ ! -d "$wheels" ]; then echo "gpu_check.sh: WHEEL_DIR '$wheels' is not a folder" >&2; exit 2; fi
case "$steps" in ''|*[!0-9]*) echo "gpu_check.sh: --steps must be a positive integer, given '$steps'" >&2; exit 2 ;; esac
wheels="$(cd "$wheels" && pwd)"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"

declare -a names=() results=() seconds=()
run_stage() {  # run_stage NAME LIMIT_S COMMAND...: run under a time limit, log to $out/NAME.log
    local name="$1" limit="$2"; shift 2
    echo; echo "== $name (limit ${limit} s): $*"
    if [ "$dry" = 1 ]; then names+=("$name"); results+=("dry-run"); seconds+=(0); return 0; fi
    local start=$SECONDS status
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    names+=("$name"); seconds+=($((SECONDS - start)))
    if [ "$status" = 0 ]; then results+=("passed"); elif [ "$status" = 124 ]; then results+=("timed out"); else results+=("failed ($status)"); fi
}

if [ "$dry" = 0 ]; then
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check.sh: $py sees no CUDA device (torch.cuda.is_available() is False)" >&2; exit 2; }
fi

# Install only what is missing; torch stays the preinstalled one (a constraint pins its version).
missing=()
for pair in einops:einops deepspeed:deepspeed hjson:hjson pydantic:pydantic sklearn:scikit-learn tqdm:tqdm \
            pytest:pytest pytest_timeout:pytest-timeout; do
    module="${pair%%:*}" package="${pair#*:}"
    "$py" -c "import $module" 2>/dev/null || missing+=("$package")
done
torch_version="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo unknown)"
echo "torch==$torch_version" > "$out/constraints.txt"
pip_offline=("$py" -m pip install --disable-pip-version-check --no-index --find-links "$wheels")
install() {
    if [ ${#missing[@]} -gt 0 ]; then "${pip_offline[@]}" -c "$out/constraints.txt" "${missing[@]}" || return 1; fi
    if ! "$py" -c "import xformers" 2>/dev/null && compgen -G "$wheels/xformers-*.whl" >/dev/null; then
        # A wheel built for another torch imports but cannot run: dispatch must skip it, not die.
        "${pip_offline[@]}" --no-deps "$wheels"/xformers-*.whl || return 1
    fi
    "${pip_offline[@]}" --no-deps --no-build-isolation -e .
}
echo "missing packages: ${missing[*]:-none}"
if [ "$dry" = 1 ]; then run_stage install 60 echo "${pip_offline[@]}" -c "$out/constraints.txt" "${missing[@]}"
else run_stage install 60 install; fi

# Every test file with CUDA cases (grep -l cuda.is_available tests), plus dispatch on this install, and the
# parallelized I3D on a one-rank NCCL group (the sharded layers' CUDA paths in one process).
run_stage cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py tests/kernels/test_dispatch.py \
    tests/kernels/test_fast_paths.py tests/sequence/test_ring_local.py tests/test_functional.py \
    "tests/sharded/test_parallelize.py::test_one_rank_group_equals_the_plain_model"
run_stage benchmark 150 "$py" scripts/benchmark.py --device cuda --json "$out/benchmark.json"
run_stage train 110 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train.py \
    --deepspeed_config configs/ds_zero2.json --steps "$steps" --wandb disabled --maps-every 0 --quiet \
    --run-dir "$out/run" --ckpt-dir "$out/checkpoints"

echo; echo "### gpu_check.sh: $("$py" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)' 2>/dev/null)"
echo; echo "| stage | result | seconds |"; echo "|---|---|---|"
failed=0
for i in "${!names[@]}"; do
    echo "| ${names[$i]} | ${results[$i]} | ${seconds[$i]} |"
    case "${results[$i]}" in passed|dry-run) ;; *) failed=1 ;; esac
done
if [ "$dry" = 0 ]; then
    echo; echo "Benchmark tables: $out/benchmark.log; training table:"; grep -A2 "^| run |" "$out/train.log" || true
fi
exit $failed
