#!/usr/bin/env bash
USAGE="Launch scripts/train.py with DeepSpeed's launcher, on one node or several.

  one node:              deepspeed.sh [--procs-per-node N] [--sp-size S] [--config FILE] [-- TRAIN ARGS]
  nodes over ssh (pdsh): deepspeed.sh --hosts n1,n2 | --hostfile FILE [...]                 (once, on n1)
  nodes without ssh:     deepspeed.sh --hosts n1,n2 | --hostfile FILE --node-rank K [...]   (on every node K)

Several nodes: --hosts writes ./.deepspeed_hostfile ('HOST slots=N'). Over ssh, this shell's WANDB_*,
OMP_NUM_THREADS, DEEPSPEED_TIMEOUT, TORCH_*, GLOO_*, NCCL_*, HF_* variables go into ./.deepspeed_env,
which DeepSpeed exports on every node (pdsh alone carries only NCCL/PYTHON/UCX/MV2/MLFLOW ones). The
working directory and the Python environment must have the same paths on every node."
OPTIONS="hosts hostfile procs-per-node sp-size config master-addr master-port node-rank env-file"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
resolve_common
multi_node_only master-addr node-rank

cmd=("$(tool deepspeed)" --master_port "$MASTER_PORT")
if [ ${#HOSTS[@]} -eq 0 ]; then
    cmd+=(--num_gpus "$PPN")
else
    hostfile="${OPT_hostfile:-.deepspeed_hostfile}"
    if [ -z "${OPT_hostfile:-}" ]; then
        printf '%s slots='"$PPN"'\n' "${HOSTS[@]}" >"$hostfile.tmp.$$"
        mv "$hostfile.tmp.$$" "$hostfile"  # atomic: launchers on a shared directory may read it meanwhile
    elif [ -n "${OPT_procs_per_node:-}" ]; then
        cmd+=(--num_gpus "$PPN")  # DeepSpeed keeps this many of each host's slots
    fi
    cmd+=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR")
    if [ -n "${OPT_node_rank:-}" ]; then
        [[ "$OPT_node_rank" =~ ^[0-9]+$ ]] && (( OPT_node_rank < NNODES )) ||
            die "--node-rank must be 0 to $(( NNODES - 1 )) (one per host of ${OPT_hostfile:---hosts}), got '$OPT_node_rank'"
        cmd+=(--no_ssh --node_rank "$OPT_node_rank")
    else
        write_env_file .deepspeed_env
        cmd+=(--launcher pdsh)
    fi
fi
run "${cmd[@]}" "$TRAIN" --deepspeed_config "$CONFIG" "${SP_ARGS[@]}" "${TRAIN_ARGS[@]}"
