#!/usr/bin/env bash
# Write this shell's WANDB_*, OMP_NUM_THREADS, DEEPSPEED_TIMEOUT, TORCH_*, GLOO_*, NCCL_*, HF_* variables
# to FILE (default ./.deepspeed_env) as KEY='VALUE' lines, for nodes started without this shell: put FILE
# on shared storage and give every node's launch --env-file FILE. (deepspeed.sh over pdsh writes
# ./.deepspeed_env itself; DeepSpeed exports it on every node.)
#   usage: write_env.sh [FILE]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case "${1:-}" in
    -h | --help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (usage: write_env.sh [FILE])" ;;
esac
[ $# -le 1 ] || die "one FILE at most (usage: write_env.sh [FILE])"
write_env_file "${1:-.deepspeed_env}"
