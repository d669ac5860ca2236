"""read_clip / read_frames: exact frames, per-shard decoding bit-equal to the whole clip cut by the
library's shard rule, decoding only from the keyframe before a shard, and every bad input refused
with VideoReadError (skippable) or ValueError/TypeError (a caller's mistake)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FRAMES, KEYINT

from nonlocal_dist.distributed.shards import even_sizes
from nonlocal_dist.testing import run_ranks
from nonlocal_dist.video import (
    VideoReadError,
    probe,
    read_clip,
    read_frames,
    shard_range,
)
from nonlocal_dist.video.decode import _import

LOSSLESS = ("x264rgb.mp4", "ffv1.mkv", "vfr.mkv")


def _source(frames, indices) -> torch.Tensor:
    return torch.from_numpy(frames[list(indices)]).permute(3, 0, 1, 2)  # (C, T, H, W)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_decode_is_exact(videos, frames, name):
    assert torch.equal(read_clip(videos[name], 0, FRAMES), _source(frames, range(FRAMES)))
    assert torch.equal(read_clip(videos[name], 5, 9, 3), _source(frames, range(5, 32, 3)))


def test_variable_frame_rate_numbers_frames_in_presentation_order(videos, frames):
    index = probe(videos["vfr.mkv"])
    gaps = set(np.diff(index.pts).tolist())
    assert len(gaps) > 1 and index.seekable, gaps  # really variable, and still sought by timestamp
    assert torch.equal(read_clip(videos["vfr.mkv"], 17, 6, 2, shard=(1, 2)), _source(frames, [23, 25, 27]))


@pytest.mark.parametrize("name", [*LOSSLESS, "bframes.mp4"])
@pytest.mark.parametrize("frame_interval", [1, 2, 3, 4])
def test_shards_equal_the_whole_clip_cut_by_even_sizes(videos, name, frame_interval):
    """1-4 ranks; clip lengths that divide, do not divide, and are shorter than the group (empty shards)."""
    path = videos[name]
    for start, clip_len in ((0, FRAMES // frame_interval), (3, 7), (9, 2)):
        whole = read_clip(path, start, clip_len, frame_interval)
        for world in (1, 2, 3, 4):
            pieces = [read_clip(path, start, clip_len, frame_interval, shard=(r, world)) for r in range(world)]
            assert [p.shape[1] for p in pieces] == list(even_sizes(clip_len, world))
            for r, piece in enumerate(pieces):
                assert torch.equal(piece, torch.tensor_split(whole, world, dim=1)[r]), (start, clip_len, world, r)
            assert torch.equal(torch.cat(pieces, dim=1), whole)


def _shard_tensor_on_ranks(rank, world, path, cases):
    import torch.distributed as dist

    from nonlocal_dist.sequence import shard_tensor

    out = []
    for start, clip_len, interval in cases:
        whole = read_clip(path, start, clip_len, interval)
        mine = read_clip(path, start, clip_len, interval, shard=(dist.get_rank(), dist.get_world_size()))
        out.append(torch.equal(mine, shard_tensor(whole, "c t h w", "t", dist.group.WORLD)) and mine.shape[1])
    return out


@pytest.mark.parametrize("world", [3, 4])
def test_shards_equal_shard_tensor_on_real_ranks(videos, world):
    cases = [(0, 10, 1), (2, 13, 2), (30, 2, 4)]  # uneven; 2 frames over 3-4 ranks leaves ranks empty
    results = run_ranks(_shard_tensor_on_ranks, world, videos["bframes.mp4"], cases, timeout=90)
    for c, (start, clip_len, interval) in enumerate(cases):
        lengths = [results[r][c] for r in range(world)]
        assert all(v is not False for v in lengths), (cases[c], lengths)
        assert [int(v) for v in lengths] == list(even_sizes(clip_len, world))


@pytest.mark.parametrize("name", ["x264rgb.mp4", "bframes.mp4", "ffv1.mkv"])
def test_decodes_only_from_the_keyframe_before_the_shard(videos, name):
    path = videos[name]
    assert probe(path).keyframes == tuple(range(0, FRAMES, KEYINT))
    for start, clip_len, interval, shard in ((0, 32, 1, (3, 4)), (5, 10, 3, (1, 2)), (0, 40, 1, (2, 4))):
        stats = {}
        read_clip(path, start, clip_len, interval, shard=shard, stats=stats)
        lo, hi = shard_range(clip_len, shard)
        first, last = start + lo * interval, start + (hi - 1) * interval
        key = first // KEYINT * KEYINT
        assert stats == {"decoded": last - key + 1, "first_decoded": key}, (start, clip_len, shard, stats)


def test_empty_shard_decodes_nothing(videos):
    stats = {}
    clip = read_clip(videos["x264rgb.mp4"], 0, 2, shard=(3, 4), size=(16, 24), stats=stats)
    assert clip.shape == (3, 0, 16, 24) and clip.dtype == torch.uint8 and stats == {}


def test_resize_is_per_frame_so_shards_stay_exact(videos):
    path = videos["bframes.mp4"]
    whole = read_clip(path, 0, 11, 2, size=20)
    assert whole.shape == (3, 11, 20, 20)
    pieces = [read_clip(path, 0, 11, 2, shard=(r, 3), size=20) for r in range(3)]
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert read_clip(path, 0, 2, size=(8, 12)).shape == (3, 2, 8, 12)


def test_repeated_and_unordered_indices(videos, frames):
    stats = {}
    clip = read_frames(videos["x264rgb.mp4"], [12, 3, 3, 12, 0], stats=stats)
    assert torch.equal(clip, _source(frames, [12, 3, 3, 12, 0])) and stats["decoded"] == 13


def test_gray(videos, frames):
    clip = read_clip(videos["ffv1.mkv"], 0, 4, fmt="gray")
    assert clip.shape == (1, 4, 32, 32) and clip.dtype == torch.uint8


# ----------------------------------------------------------------------------- bad input


def _damaged(tmp_path: Path, src: str, name: str, edit) -> str:
    data = bytearray(Path(src).read_bytes())
    out = tmp_path / name
    out.write_bytes(bytes(edit(data)))
    return str(out)


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError, match="no such file; check the annotation file's path"):
        read_clip(tmp_path / "nope.mp4", 0, 4)


def test_not_a_video(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match="not a readable video"):
        read_clip(path, 0, 4)


def test_corrupt_header(tmp_path, videos):
    def zero_head(data):
        data[:2048] = bytes(2048)
        return data

    for name in ("x264rgb.mp4", "ffv1.mkv"):
        path = _damaged(tmp_path, videos[name], "head-" + name, zero_head)
        with pytest.raises(VideoReadError):
            read_clip(path, 0, 4)


@pytest.mark.parametrize("name, match", [("x264rgb.mp4", "not a readable video"),
                                         ("faststart.mp4", "header declares 40 frames but the file holds"),
                                         ("ffv1.mkv", "header says 1.600 s of video but its frames end at")])
def test_truncated(tmp_path, videos, name, match):
    path = _damaged(tmp_path, videos[name], "cut-" + name, lambda data: data[: len(data) * 6 // 10])
    with pytest.raises(VideoReadError, match=match):
        read_clip(path, 0, 4, shard=(0, 2))


def test_clip_past_the_end(videos):
    with pytest.raises(VideoReadError, match=r"frame 6 asked for, the video has 5 frames .*loop"):
        read_clip(videos["short.mp4"], 0, 4, 2, shard=(1, 2))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"shard": (2, 2)}, ValueError, r"0 <= rank < world, got \(2, 2\)"),
    ({"shard": 1}, TypeError, r"pair of ints \(rank, world\), got 1"),
    ({"size": 0}, ValueError, "short side"),
    ({"size": (4, "a")}, TypeError, r"\(H, W\)"),
    ({"fmt": "yuv"}, ValueError, "fmt must be one of"),
    ({"backend": "opencv"}, ValueError, "backend must be one of"),
    ({"frame_interval": 0}, ValueError, "frame_interval must be an int >= 1, got 0"),
])
def test_bad_arguments(videos, kwargs, error, match):
    with pytest.raises(error, match=match):
        read_clip(videos["x264rgb.mp4"], 0, 4, **kwargs)


@pytest.mark.parametrize("backend", ["torchcodec", "decord"])
def test_other_backends_give_the_same_frames(videos, backend):
    try:
        _import(backend)
    except ImportError as exc:  # not installed, or installed without the libraries it loads
        pytest.skip(str(exc))
    for name in ("x264rgb.mp4", "bframes.mp4"):
        ref = read_clip(videos[name], 3, 9, 2, shard=(1, 2))
        assert torch.equal(read_clip(videos[name], 3, 9, 2, shard=(1, 2), backend=backend), ref)
