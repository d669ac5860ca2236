#!/usr/bin/env bash
# Fresh machine -> installed environment -> the main job: a C2D video classifier with non-local
# blocks trained on digit clips with DeepSpeed (2 CPU ranks, sequence parallel over time, ZeRO-2),
# then the same network without non-local blocks (the ablation), and the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "deepspeed,wandb,train"
export OMP_NUM_THREADS=1 WANDB_SILENT=true
run_dir="${RUN_DIR:-runs/demo}"
rm -rf "$run_dir"
for variant in nonlocal ablation; do
    extra=()
    [ "$variant" = ablation ] && extra=(--ablation)
    echo "== training: $variant =="
    .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" scripts/train.py \
        --deepspeed_config configs/ds_zero2.json --sp-size 2 \
        --ckpt-dir "$run_dir/ckpt-$variant" --run-dir "$run_dir" --wandb offline "${extra[@]}" "$@"
done
.venv/bin/python scripts/summarize.py "$run_dir"
