#!/usr/bin/env bash
USAGE="Launch scripts/train.py with torchrun, on one node or several.

  one node:      torchrun.sh [--procs-per-node N] [--sp-size S] [--config FILE] [-- TRAIN ARGS]
  several nodes: torchrun.sh --hosts n1,n2,... [...]          (on every node, the same command)

One node: --standalone (a private rendezvous on a free port). Several nodes: every node's agent joins
a c10d rendezvous at --master-addr:--master-port (default: the first host, port 29500), which the agent
on that host serves; nodes get their ranks in the order they join. Each node sees only its own shell's
variables: --env-file FILE on shared storage (see write_env.sh) gives all of them the same ones."
OPTIONS="hosts procs-per-node sp-size config master-addr master-port rdzv-id env-file"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
resolve_common
multi_node_only master-addr master-port rdzv-id

cmd=("$(tool torchrun)" --nproc_per_node "$PPN")
if [ ${#HOSTS[@]} -eq 0 ]; then
    cmd+=(--standalone)
else
    cmd+=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv_id "${OPT_rdzv_id:-nonlocal_dist}")
fi
run "${cmd[@]}" "$TRAIN" --deepspeed_config "$CONFIG" "${SP_ARGS[@]}" "${TRAIN_ARGS[@]}"
