#!/usr/bin/env bash
# Fresh machine -> installed environment -> the main job: an I3D video classifier (temporal convolutions,
# strided max pooling) with non-local blocks trained on 16-frame digit clips with DeepSpeed: 2 CPU ranks,
# each clip sharded over time by nonlocal_dist.parallelize (halo exchange for the temporal convolutions
# and the pooling), ZeRO-2; then the same network without non-local blocks (the ablation), and the
# comparison table. MODEL=c2d trains the C2D model (1x3x3 convolutions, 4-frame clips) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "deepspeed,wandb,train"
export OMP_NUM_THREADS=1 WANDB_SILENT=true
run_dir="${RUN_DIR:-runs/demo}"
model="${MODEL:-i3d}"
rm -rf "$run_dir"
for variant in nonlocal ablation; do
    extra=()
    [ "$variant" = ablation ] && extra=(--ablation)
    echo "== training: $model $variant =="
    .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" scripts/train.py \
        --model "$model" --deepspeed_config configs/ds_zero2.json --sp-size 2 \
        --ckpt-dir "$run_dir/ckpt-$variant" --run-dir "$run_dir" --wandb offline "${extra[@]}" "$@"
done
.venv/bin/python scripts/summarize.py "$run_dir"
