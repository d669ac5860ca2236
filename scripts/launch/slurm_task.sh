#!/usr/bin/env bash
# One SLURM task = one training process (srun, from slurm.sbatch, starts one per process on every node):
# the variables torch.distributed and DeepSpeed read, from srun's, then the command.
#   usage: slurm_task.sh COMMAND [ARGS...]      (needs SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
#          SLURM_NODEID, MASTER_ADDR, MASTER_PORT; SLURM_NTASKS_PER_NODE if set)
set -euo pipefail
case "${1:---help}" in -h | --help) sed -n '2,5s/^# \{0,1\}//p' "$0"; [ $# -gt 0 ]; exit ;; esac
for name in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID MASTER_ADDR MASTER_PORT; do
    [ -n "${!name:-}" ] || { echo "slurm_task.sh: $name is not set: run under srun, as slurm.sbatch does" >&2; exit 2; }
done
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID" NODE_RANK="$SLURM_NODEID"
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then  # DeepSpeed's CPU accelerator counts devices by LOCAL_SIZE
    export LOCAL_WORLD_SIZE="$SLURM_NTASKS_PER_NODE" LOCAL_SIZE="$SLURM_NTASKS_PER_NODE"
fi
echo "slurm_task.sh: $(hostname) rank $RANK of $WORLD_SIZE, local rank $LOCAL_RANK, node $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT"
exec "$@"
