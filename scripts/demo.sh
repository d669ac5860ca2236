#!/usr/bin/env bash
# Fresh machine -> installed environment -> the main job: video classifiers with non-local blocks
# trained on digit clips with DeepSpeed (2 CPU ranks, sequence parallel over time, ZeRO-2), each
# next to the same network without non-local blocks (the ablation), then the comparison table:
#   c2d: the paper's C2D + NL (1x3x3 convolutions, non-local blocks sharded over time);
#   i3d: an I3D with temporal convolutions and strided max pooling on 12-frame clips, the whole
#        network sharded over time by nonlocal_dist.parallelize (halo exchange); its non-local
#        blocks start open (zero_init=False).
# The clips are written once as lossless video files with annotation files (VIDEOS, default
# runs/videos, kept between runs) and read back through VideoClipDataset and a DataLoader, each
# sequence-parallel rank decoding only its own frames (the same clips, bit for bit, as in memory);
# the first epoch decodes, later epochs crop and flip the decoded shards kept in a 64 MiB cache per
# loader worker (--video-cache-mb; the digit shards take 2-5 MB a rank).
# MODELS="c2d" or MODELS="i3d" runs one of them (default: both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "deepspeed,wandb,train,video"
export OMP_NUM_THREADS=1 WANDB_SILENT=true
run_dir="${RUN_DIR:-runs/demo}"
videos="${VIDEOS:-runs/videos}"
rm -rf "$run_dir"
for model in ${MODELS:-c2d i3d}; do
    for variant in nonlocal ablation; do
        extra=()
        [ "$variant" = ablation ] && extra=(--ablation)
        echo "== training: $model $variant =="
        .venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" scripts/train.py \
            --model "$model" --deepspeed_config configs/ds_zero2.json --sp-size 2 \
            --ckpt-dir "$run_dir/ckpt-$model-$variant" --run-dir "$run_dir" --wandb offline \
            --videos "$videos" --video-cache-mb 64 "${extra[@]}" "$@"
    done
done
.venv/bin/python scripts/summarize.py "$run_dir"
