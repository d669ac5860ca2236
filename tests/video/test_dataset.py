"""VideoClipDataset: the ranks of a sequence-parallel group get the shards of one clip, cropped and
flipped alike; data-parallel groups get different clips; unreadable clips are dropped by the whole
group together (agree_usable) and counted, with no rank left waiting."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nonlocal_dist.testing import run_ranks
from nonlocal_dist.video import (
    ClipTransform,
    EvalBatchSampler,
    TrainBatchSampler,
    VideoClipDataset,
    agree_usable,
    clip_loader,
    collate_clips,
    read_annotations,
)

NAMES = ["x264rgb.mp4", "bframes.mp4", "ffv1.mkv", "vfr.mkv", "short.mp4", "faststart.mp4"]
TRANSFORM = ClipTransform(short_side=24, crop_size=16, flip_ratio=0.5)


@pytest.fixture(scope="session")
def ann_file(videos) -> Path:
    root = Path(videos["x264rgb.mp4"]).parent
    path = root / "train.txt"
    path.write_text("".join(f"{NAMES[i % len(NAMES)]} {i % 3}\n" for i in range(12)))
    return path


def _dataset(ann_file, **kwargs) -> VideoClipDataset:
    args = {"clip_len": 7, "frame_interval": 2, "transform": TRANSFORM, **kwargs}
    return VideoClipDataset(ann_file, ann_file.parent, **args)


def test_annotation_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a/x.mp4 3\n\nb/y.mp4 0\n")
    assert read_annotations(tmp_path / "a.txt") == ([("a/x.mp4", 3), ("b/y.mp4", 0)], None)
    (tmp_path / "k.csv").write_text("path,label\nclips/a b.mp4,riding\nclips/c.mp4,abseiling\n")
    assert read_annotations(tmp_path / "k.csv") == ([("clips/a b.mp4", 1), ("clips/c.mp4", 0)], ["abseiling", "riding"])
    (tmp_path / "bad.txt").write_text("x.mp4 1\ny.mp4\n")
    with pytest.raises(ValueError, match=r"line 2 is \['y.mp4'\]; expected two fields, a path and a label"):
        read_annotations(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        read_annotations(tmp_path / "none.txt")


@pytest.mark.parametrize("num_clips, test_mode", [(1, False), (2, False), (2, True)])
def test_shards_of_an_item_make_the_whole_item(ann_file, num_clips, test_mode):
    """Every rank's shard, concatenated over time, is the unsharded item: same frames, same crop and flip."""
    whole = _dataset(ann_file, num_clips=num_clips, test_mode=test_mode)
    world = 3
    parts = [_dataset(ann_file, num_clips=num_clips, test_mode=test_mode, shard=(r, world)) for r in range(world)]
    for index in range(len(whole)):
        for epoch in (0, 1):
            ref = whole[(index, epoch)]
            pieces = [p[(index, epoch)] for p in parts]
            assert ref["ok"] and all(p["ok"] for p in pieces)
            assert torch.equal(torch.cat([p["clip"] for p in pieces], dim=-3), ref["clip"])
    shape = (num_clips, 3, 7, 16, 16) if num_clips > 1 else (3, 7, 16, 16)
    assert ref["clip"].shape == shape and ref["clip"].dtype == torch.float32


def test_crop_and_flip_change_with_epoch_and_clip(ann_file):
    data = _dataset(ann_file, clip_len=2, frame_interval=1)
    draws = {(i, e): data[(i, e)]["clip"] for i in (0, 6) for e in range(6)}
    assert len({tuple(d.flatten()[:64].tolist()) for d in draws.values()}) > 6


def test_unreadable_clip_is_returned_as_unusable(tmp_path, ann_file):
    (tmp_path / "ann.txt").write_text("gone.mp4 1\n")
    item = VideoClipDataset(tmp_path / "ann.txt", tmp_path, clip_len=4)[0]
    assert not item["ok"] and item["clip"] is None and "no such file" in item["error"]
    batch = collate_clips([item, _dataset(ann_file)[0]])
    usable, skipped = agree_usable(batch)
    assert usable["index"].tolist() == [0] and usable["clip"].shape[0] == 1
    assert skipped == [(0, item["error"])]


def test_short_video_loops(ann_file, frames):
    data = VideoClipDataset(ann_file, ann_file.parent, clip_len=8, test_mode=True,
                            transform=ClipTransform(mean=(0, 0, 0), std=(1, 1, 1)))
    clip = data[4]["clip"]  # short.mp4: 5 frames
    expected = torch.from_numpy(frames[[0, 1, 2, 3, 4, 0, 1, 2]]).permute(3, 0, 1, 2).float()
    assert torch.equal(clip, expected)


def test_decoded_shard_cache_gives_the_uncached_items(ann_file, tmp_path):
    """With cache_mb, later epochs read the kept frames: items equal to the uncached dataset's (new crops and
    flips every epoch), each shard decoded once, the byte bound kept, and a clip that fails is not kept."""
    plain = _dataset(ann_file, shard=(1, 3))
    cached = _dataset(ann_file, shard=(1, 3), cache_mb=1)
    for epoch in range(3):
        for index in range(len(plain)):
            assert torch.equal(cached[(index, epoch)]["clip"], plain[(index, epoch)]["clip"]), (index, epoch)
    info = cached.cache_info()
    # training draws new frames each epoch from the long videos; short.mp4 (clips 4 and 10, 5 frames) always
    # gives frames 0..4 looped, so its later epochs hit. Each kept shard is 3 x 2 x 24 x 24 bytes.
    assert info["hits"] + info["misses"] == 3 * len(plain) and info["hits"] >= 4
    assert info["bytes"] == info["clips"] * 3 * 2 * 24 * 24 and info["bytes"] <= info["max_bytes"] == 2**20
    fixed = _dataset(ann_file, shard=(0, 2), test_mode=True, cache_mb=1)
    first = [fixed[i]["clip"] for i in range(len(fixed))]
    assert [torch.equal(fixed[i]["clip"], first[i]) for i in range(len(fixed))] == [True] * len(fixed)
    assert fixed.cache_info()["hits"] == len(fixed) == fixed.cache_info()["misses"]
    tiny = _dataset(ann_file, test_mode=True, cache_mb=3 * 7 * 24 * 24 * 1.5 / 2**20)  # room for one clip
    for i in range(4):
        tiny[i]
    assert tiny.cache_info()["clips"] == 1 and tiny[3] is not None and tiny.cache_info()["hits"] == 1
    (tmp_path / "ann.txt").write_text("gone.mp4 1\n")
    missing = VideoClipDataset(tmp_path / "ann.txt", tmp_path, clip_len=4, cache_mb=1)
    assert not missing[0]["ok"] and not missing[0]["ok"] and missing.cache_info()["clips"] == 0
    with pytest.raises(ValueError, match="cache_mb must be a number >= 0"):
        _dataset(ann_file, cache_mb=-1)


def test_bad_dataset_arguments(ann_file):
    with pytest.raises(ValueError, match=r"fmt='gray' decodes 1 channel\(s\), the transform's mean/std have 3"):
        _dataset(ann_file, fmt="gray")
    with pytest.raises(ValueError, match="clip_len must be an int >= 1, got 0"):
        _dataset(ann_file, clip_len=0)
    with pytest.raises(ValueError, match="crop_size must be"):
        ClipTransform(crop_size=(0, 3))


def test_dataloader_workers_give_the_plain_loop_batches(ann_file):
    data = _dataset(ann_file, shard=(1, 2))
    sampler = TrainBatchSampler(len(data), 3, dp_rank=1, dp_size=2, steps=4, start_step=1, seed=5)
    loader = clip_loader(data, sampler, workers=2, timeout=120)  # a hung worker fails in 2 minutes
    plain = [collate_clips([data[key] for key in keys]) for keys in sampler]
    for got, ref in zip(loader, plain, strict=True):
        assert torch.equal(got["clip"], ref["clip"]) and torch.equal(got["index"], ref["index"])
    assert sum(len(b) for b in EvalBatchSampler(11, 3, 1, 2)) == 5 and len(EvalBatchSampler(11, 3, 0, 2)) == 2


def _group_run(rank, world, ann_file, bad_root):
    """2 data-parallel groups x 2 sequence-parallel ranks; rank 3 reads from a root where one video is corrupt."""
    import torch.distributed as dist

    from nonlocal_dist.sequence import gather_tensor

    sp_size = 2
    groups = [dist.new_group([g * sp_size + r for r in range(sp_size)]) for g in range(world // sp_size)]
    dp_rank, sp_rank = divmod(rank, sp_size)
    group = groups[dp_rank]
    root = bad_root if rank == 3 else ann_file.parent
    data = VideoClipDataset(ann_file, root, clip_len=7, frame_interval=2, transform=TRANSFORM, shard=(sp_rank, sp_size))
    whole = VideoClipDataset(ann_file, ann_file.parent, clip_len=7, frame_interval=2, transform=TRANSFORM)
    sampler = TrainBatchSampler(len(data), 3, dp_rank, world // sp_size, steps=4, seed=1)
    seen, skipped = [], []
    for batch in clip_loader(data, sampler):
        usable, skips = agree_usable(batch, group)
        skipped += [i for i, _ in skips]
        full = gather_tensor(usable["clip"], "b c t h w", "t", group)
        for clip, index, epoch in zip(full, usable["index"].tolist(), usable["epoch"].tolist()):
            assert torch.equal(clip, whole[(index, epoch)]["clip"]), (rank, index, epoch)
        seen += usable["index"].tolist()
    try:
        agree_usable(collate_clips([data[rank]]), group)  # the group's ranks hold different clips
    except ValueError as exc:
        mismatch = str(exc)
    return seen, skipped, mismatch


def test_groups_agree_on_usable_clips_and_differ_across_data_parallel(tmp_path, ann_file):
    bad_root = tmp_path / "bad"
    shutil.copytree(ann_file.parent, bad_root)
    (bad_root / "ffv1.mkv").write_bytes(b"\0" * 1000)  # index 2 and 8 on rank 3 only
    results = run_ranks(_group_run, 4, ann_file, bad_root, timeout=120)
    (seen0, skip0, msg0), (seen1, skip1, _), (seen2, skip2, _), (seen3, skip3, msg3) = results
    assert seen0 == seen1 and seen2 == seen3 and skip0 == skip1 == [] and skip2 == skip3
    assert set(skip2) <= {2, 8} and skip2 and not set(seen2) & {2, 8}
    sampler = [TrainBatchSampler(12, 3, d, 2, steps=4, seed=1) for d in range(2)]
    for step in range(4):  # the two data-parallel groups read different clips at every step
        assert not {i for i, _ in sampler[0].batch(step)} & {i for i, _ in sampler[1].batch(step)}
    assert "every rank of a sequence-parallel group reads the same clips" in msg0 and "clips" in msg3
