"""The demo's digit clips written as video files read back, sharded over time, as the in-memory clips
bit for bit (so training from files keeps the in-memory run's accuracies)."""
from __future__ import annotations

import pytest
import torch

from nonlocal_dist.data import DIGIT_VIDEO_SCALE, digit_clips, write_digit_videos
from nonlocal_dist.video import ClipTransform, VideoClipDataset

pytest.importorskip("sklearn")


def test_digit_videos_read_back_exactly(tmp_path):
    args = (6, "test", 12, 16, 0, 3, 9)
    ann = write_digit_videos(tmp_path, *args)
    assert write_digit_videos(tmp_path, *args) == ann  # written once, reused
    clips, labels = digit_clips(*args)
    transform = ClipTransform(mean=(0,), std=(DIGIT_VIDEO_SCALE,))
    shards = [VideoClipDataset(ann, tmp_path, clip_len=12, fmt="gray", transform=transform, test_mode=True,
                               shard=(r, 2)) for r in range(2)]
    for i in range(len(labels)):
        items = [s[i] for s in shards]
        assert all(item["label"] == int(labels[i]) for item in items)
        assert torch.equal(torch.cat([item["clip"] for item in items], dim=1), clips[i])
