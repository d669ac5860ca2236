#!/usr/bin/env bash
# Fresh machine -> installed environment -> the main job: a C2D video classifier with non-local
# blocks trained on digit clips with DeepSpeed (2 CPU ranks, sequence parallel over time, ZeRO-2),
# then the same network without non-local blocks (the ablation), and the comparison table.
# MODEL=i3d trains the I3D instead (temporal convolutions and strided max pooling, 12-frame clips,
# each clip sharded over time by nonlocal_dist.parallelize with halo exchange; non-local blocks
# start open (zero_init=False); about 5 min per run on 2 cores; its take-off step still varies
# with seeds and rounding, 250 to 950 steps, so C2D stays the default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "deepspeed,wandb,train"
export OMP_NUM_THREADS=1 WANDB_SILENT=true
run_dir="${RUN_DIR:-runs/demo}"
model="${MODEL:-c2d}"
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
