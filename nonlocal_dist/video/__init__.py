"""Video from disk for sequence-parallel training: every rank of a group decodes only its own time
shard of the clip (``read_clip(..., shard=(rank, world))``), with mmaction2's sampling and transforms
whose random parameters every rank draws alike. Needs PyAV: ``pip install 'nonlocal-dist[video]'``."""
from __future__ import annotations

from nonlocal_dist.video.dataset import (
    EvalBatchSampler,
    TrainBatchSampler,
    VideoClipDataset,
    agree_usable,
    clip_loader,
    collate_clips,
    read_annotations,
)
from nonlocal_dist.video.decode import (
    BACKENDS,
    VideoIndex,
    VideoReadError,
    num_frames,
    output_size,
    probe,
    read_clip,
    read_frames,
    shard_range,
)
from nonlocal_dist.video.sampling import sample_clips
from nonlocal_dist.video.transforms import ClipTransform, CropFlip, clip_rng

__all__ = [
    "BACKENDS",
    "ClipTransform",
    "CropFlip",
    "EvalBatchSampler",
    "TrainBatchSampler",
    "VideoClipDataset",
    "VideoIndex",
    "VideoReadError",
    "agree_usable",
    "clip_loader",
    "clip_rng",
    "collate_clips",
    "num_frames",
    "output_size",
    "probe",
    "read_annotations",
    "read_clip",
    "read_frames",
    "sample_clips",
    "shard_range",
]
