"""Decode video frames by index, optionally only one rank's time shard of a clip.

Frames are numbered in presentation order from 0 (as decord, PyAV and torchcodec number them in
mmaction2), whatever the timestamps: a variable frame rate changes how far apart in time the
sampled frames are, not which frames a clip gets. A shard ``(rank, world)`` of a clip of T frames
holds the contiguous piece ``even_sizes(T, world)[rank]`` from its start (``shard_tensor``'s rule:
the first ``T % world`` ranks one frame longer, the last ranks empty when T < world), and PyAV
decodes only from the keyframe at or before the first frame the shard needs to the last one.

Backends: ``"pyav"`` (the ``video`` extra), ``"torchcodec"`` and ``"decord"`` when installed; all
return the same frames for the same indices (the decoders are exact for lossless streams; lossy
ones agree where both decode from the same keyframe).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed.shards import even_sizes, piece

BACKENDS = ("pyav", "torchcodec", "decord")
FORMATS = {"rgb24": 3, "gray": 1}
_INSTALL = {"pyav": "pip install 'nonlocal-dist[video]'  (PyAV, with FFmpeg in its wheel)",
            "torchcodec": "pip install torchcodec  (needs FFmpeg libraries on the system)",
            "decord": "pip install decord"}


class VideoReadError(RuntimeError):
    """A video that cannot give the frames asked for: missing, unreadable, corrupt, truncated or empty.

    ``VideoClipDataset`` turns it into an unusable clip (skipped and counted); other exceptions are bugs
    and propagate."""


@dataclass(frozen=True)
class VideoIndex:
    """What one demux pass (no decoding) learns: every frame's presentation timestamp (``pts``, in
    presentation order), the frame numbers of the keyframes, the frame size, and whether the stream
    can be sought (every packet timestamped, no two alike)."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    height: int
    width: int
    seekable: bool

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @cached_property
    def frame_of_pts(self) -> dict[int, int]:
        """{presentation timestamp: frame number} (a seekable stream's timestamps are unique)."""
        return {pts: k for k, pts in enumerate(self.pts)}

    def keyframe_before(self, frame: int) -> int:
        """The last keyframe at or before ``frame`` (0 when none is marked)."""
        i = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return self.keyframes[i] if i >= 0 else 0


def shard_range(length: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(start, stop)`` of this rank's piece of ``length`` positions (the whole when ``shard`` is None)."""
    if shard is None:
        return 0, length
    rank, world = check_shard(shard)
    return piece(even_sizes(length, world), rank)


def check_shard(shard) -> tuple[int, int]:
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        raise TypeError(f"shard must be a pair of ints (rank, world), got {shard!r}; e.g. shard=(sp_rank, sp_size)")
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard=(rank, world) needs world >= 1 and 0 <= rank < world, got {tuple(shard)}")
    return rank, world


def output_size(height: int, width: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """Frame size after ``size``: None keeps it; an int sets the short side keeping the aspect ratio
    (mmaction2's ``Resize(scale=(-1, size))``, long side rounded half up); ``(H, W)`` sets both."""
    if size is None:
        return height, width
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size (the short side) must be >= 1, got {size}")
        if height <= width:
            return size, int(width * size / height + 0.5)
        return int(height * size / width + 0.5), size
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        return int(size[0]), int(size[1])
    raise TypeError(f"size must be None, an int (short side) or a pair of ints (H, W) >= 1, got {size!r}")


def _import(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        if backend == "pyav":
            import av
            return av
        if backend == "torchcodec":
            import torchcodec.decoders
            return torchcodec.decoders
        import decord
        return decord
    except ImportError as exc:
        raise ImportError(f"video backend {backend!r} is not installed ({exc}); install it: {_INSTALL[backend]}") from exc
    except OSError as exc:  # installed, but its native libraries do not load (torchcodec without FFmpeg)
        raise ImportError(f"video backend {backend!r} is installed but does not load ({exc}); torchcodec needs "
                          "FFmpeg's shared libraries (e.g. apt install ffmpeg, or conda install ffmpeg) and a "
                          f"torch it was built for; or use backend='pyav' ({_INSTALL['pyav']})") from exc


def _open(av, path: str):
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such file; check the annotation file's path and the dataset root")
    try:
        container = av.open(path)
    except av.error.FFmpegError as exc:
        raise VideoReadError(f"{path}: not a readable video ({exc}); the file is corrupt, truncated before its "
                             "header, or not a video: re-download or re-encode it") from exc
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: the file has no video stream")
    return container


_INDEX_CACHE: OrderedDict = OrderedDict()
_INDEX_CACHE_SIZE = 4096


def probe(path: str | os.PathLike) -> VideoIndex:
    """The frame index of the first video stream of ``path`` (one demux pass, cached per process by
    path, size and modification time). Raises ``VideoReadError`` for a missing, unreadable,
    truncated (fewer packets than the header's frame count) or frameless file."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _INDEX_CACHE:
        _INDEX_CACHE.move_to_end(key)
        return _INDEX_CACHE[key]
    index = _build_index(path)
    if key is not None:
        _INDEX_CACHE[key] = index
        if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return index


def clear_index_cache() -> None:
    """Forget every frame index ``probe`` cached in this process (the next read demuxes again)."""
    _INDEX_CACHE.clear()


def _build_index(path: str) -> VideoIndex:
    av = _import("pyav")
    with _open(av, path) as container:
        stream = container.streams.video[0]
        height, width, declared = stream.codec_context.height, stream.codec_context.width, stream.frames
        # A video-only file's header duration covers only the video: its frames must reach it.
        header_end = container.duration / 1e6 if container.duration and len(container.streams) == 1 else None
        rate, time_base = stream.average_rate, stream.time_base
        entries = []
        try:
            for packet in container.demux(stream):
                if packet.size and not packet.is_discard:
                    entries.append((packet.pts, packet.is_keyframe))
        except av.error.FFmpegError as exc:
            raise VideoReadError(f"{path}: demuxing failed after {len(entries)} frames ({exc}): the file is "
                                 "corrupt or truncated; re-download or re-encode it") from exc
    if not entries:
        raise VideoReadError(f"{path}: the video stream has no frames")
    if declared and len(entries) < declared:
        raise VideoReadError(f"{path}: truncated: its header declares {declared} frames but the file holds "
                             f"{len(entries)}; re-download or re-encode it")
    stamps = [pts for pts, _ in entries]
    if header_end is not None and rate and time_base and None not in stamps:
        end = float((max(stamps) - min(stamps)) * time_base) + float(1 / rate)
        if end < header_end - 1.5 / float(rate):
            raise VideoReadError(f"{path}: truncated: its header says {header_end:.3f} s of video but its frames "
                                 f"end at {end:.3f} s; re-download or re-encode it")
    seekable = None not in stamps and len(set(stamps)) == len(stamps)
    if not seekable:  # frames numbered in decode order; decoding always starts at frame 0
        return VideoIndex(tuple(range(len(entries))), (0,), height, width, False)
    order = sorted(range(len(entries)), key=stamps.__getitem__)
    position = {i: k for k, i in enumerate(order)}
    keyframes = tuple(sorted(position[i] for i, (_, key) in enumerate(entries) if key))
    return VideoIndex(tuple(stamps[i] for i in order), keyframes or (0,), height, width, True)


def _decode_pyav(path: str, wanted: list[int], index: VideoIndex, fmt: str, threads: int, stats: dict) -> dict:
    """Frames ``wanted`` (sorted, unique) as {frame: (H, W, C) uint8 array}, decoding from the keyframe at
    or before ``wanted[0]`` to ``wanted[-1]``; once more from frame 0 when the seek lands after it."""
    av = _import("pyav")
    first = index.keyframe_before(wanted[0]) if index.seekable else 0
    frames = _decode_from(av, path, wanted, index, first, fmt, threads, stats)
    if frames is None:  # the demuxer's seek overshot (an index this file lacks): decode from the start
        stats["fallbacks"] = stats.get("fallbacks", 0) + 1
        frames = _decode_from(av, path, wanted, index, 0, fmt, threads, stats)
    if frames is None or len(frames) < len(wanted):
        missing = [k for k in wanted if k not in (frames or {})]
        raise VideoReadError(f"{path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} did not decode "
                             f"(the file holds {index.num_frames} frame packets): corrupt or truncated data")
    return frames


def _decode_from(av, path, wanted, index, first, fmt, threads, stats) -> dict | None:
    want, last = set(wanted), wanted[-1]
    number = index.frame_of_pts if index.seekable else None
    frames: dict = {}
    with _open(av, path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if first > 0:
            container.seek(index.pts[first], stream=stream, backward=True, any_frame=False)
        count = 0
        try:
            for frame in container.decode(stream):
                k = number.get(frame.pts) if number is not None else count
                count += 1
                if k is None:
                    raise VideoReadError(f"{path}: a decoded frame has timestamp {frame.pts}, which no packet has")
                if count == 1 and k > first:
                    stats["decoded"] = stats.get("decoded", 0) + count
                    return None
                if frame.is_corrupt:
                    raise VideoReadError(f"{path}: frame {k} decoded with errors (corrupt or truncated data)")
                if k in want:
                    frames[k] = frame.to_ndarray(format=fmt)
                if k >= last:
                    break
        except av.error.FFmpegError as exc:
            raise VideoReadError(f"{path}: decoding failed near frame {count} ({exc}): corrupt or truncated "
                                 "data; re-download or re-encode it") from exc
        stats["decoded"] = stats.get("decoded", 0) + count
        stats["first_decoded"] = first
    return frames


def _decode_other(backend: str, path: str, wanted: list[int], fmt: str, threads: int) -> tuple[dict, int, int]:
    """torchcodec or decord: {frame: (H, W, C) uint8 array}, and the frame size (H, W)."""
    if fmt != "rgb24":
        raise ValueError(f"backend {backend!r} decodes RGB only; use fmt='rgb24' or backend='pyav' for {fmt!r}")
    module = _import(backend)
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such file; check the annotation file's path and the dataset root")
    try:
        if backend == "torchcodec":
            decoder = module.VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=threads)
            total = decoder.metadata.num_frames
            array = decoder.get_frames_at(indices=wanted).data.numpy() if wanted else None
            height, width = decoder.metadata.height, decoder.metadata.width
        else:
            reader = module.VideoReader(path, num_threads=threads)
            total = len(reader)
            array = reader.get_batch(wanted).asnumpy() if wanted else None
            height, width = reader[0].shape[:2]
    except Exception as exc:  # each library raises its own types for unreadable files
        raise VideoReadError(f"{path}: {backend} could not decode it ({type(exc).__name__}: {exc})") from exc
    if wanted and wanted[-1] >= total:
        raise VideoReadError(f"{path}: frame {wanted[-1]} asked for, the video has {total} frames")
    return ({k: array[i] for i, k in enumerate(wanted)} if wanted else {}), height, width


def num_frames(path: str | os.PathLike) -> int:
    """Frames in the first video stream of ``path`` (PyAV's count of frame packets; the sampling of every
    backend uses it, so one clip gets the same frame numbers whichever decoder is chosen)."""
    return probe(path).num_frames


def read_frames(path: str | os.PathLike, indices: Sequence[int], *, size: int | tuple[int, int] | None = None,
                fmt: str = "rgb24", backend: str = "pyav", threads: int = 1, stats: dict | None = None) -> Tensor:
    """Frames ``indices`` (any order, repeats allowed, 0-based in presentation order) of ``path`` as a
    (C, T, H, W) uint8 tensor, T = len(indices), C = 3 (``fmt="rgb24"``) or 1 (``"gray"``).

    Only the frames from the keyframe at or before ``min(indices)`` to ``max(indices)`` are decoded
    (PyAV); each once, however often it is asked for. ``size`` resizes every frame (see
    ``output_size``; bilinear with antialiasing, rounded to uint8, the same for every backend).
    ``stats``: a dict that receives ``decoded`` (frames decoded) and ``first_decoded`` (PyAV).
    Raises ``VideoReadError`` when the file cannot give these frames (index past the end included).
    """
    path = os.fspath(path)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0: FFmpeg chooses), got {threads!r}")
    indices = [int(k) for k in indices]
    if any(k < 0 for k in indices):
        raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
    wanted = sorted(set(indices))
    stats = {} if stats is None else stats
    if backend == "pyav":
        index = probe(path)
        height, width = index.height, index.width
        if wanted and wanted[-1] >= index.num_frames:
            raise VideoReadError(f"{path}: frame {wanted[-1]} asked for, the video has {index.num_frames} frames "
                                 "(0 to {}); sample within the video or loop (sample_clips' out_of_bound)"
                                 .format(index.num_frames - 1))
        frames = _decode_pyav(path, wanted, index, fmt, threads, stats) if wanted else {}
    else:
        frames, height, width = _decode_other(backend, path, wanted, fmt, threads)
    out_h, out_w = output_size(height, width, size)
    channels = FORMATS[fmt]
    clip = torch.empty((len(indices), height, width, channels), dtype=torch.uint8)
    for t, k in enumerate(indices):
        clip[t] = torch.from_numpy(frames[k].reshape(height, width, channels))
    clip = clip.permute(3, 0, 1, 2)  # (C, T, H, W)
    if (out_h, out_w) != (height, width):
        clip = _resize(clip, out_h, out_w)
    return clip.contiguous()


def _resize(clip: Tensor, height: int, width: int) -> Tensor:
    """(C, T, H, W) uint8 -> (C, T, height, width) uint8, frame by frame (bilinear, antialiased)."""
    if clip.shape[1] == 0:
        return clip.new_empty((clip.shape[0], 0, height, width))
    frames = clip.permute(1, 0, 2, 3).float()
    out = F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3)


def clip_indices(start: int, clip_len: int, frame_interval: int = 1) -> list[int]:
    """``start, start + frame_interval, ...`` (``clip_len`` of them)."""
    for name, value, low in (("start", start, 0), ("clip_len", clip_len, 1), ("frame_interval", frame_interval, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return [start + k * frame_interval for k in range(clip_len)]


def read_clip(path: str | os.PathLike, start: int, clip_len: int, frame_interval: int = 1,
              shard: tuple[int, int] | None = None, size: int | tuple[int, int] | None = None, *,
              fmt: str = "rgb24", backend: str = "pyav", threads: int = 1, stats: dict | None = None) -> Tensor:
    """Frames ``start + k * frame_interval`` for k < ``clip_len`` as (C, T, H, W) uint8.

    ``shard=(rank, world)``: only this rank's frames, (C, T_r, H, W) with T_r = ``even_sizes(clip_len,
    world)[rank]`` (0 on the last ranks when clip_len < world): bit-equal to ``shard_tensor`` of the
    whole clip along T, and only they (from the keyframe before the first) are decoded.
    """
    indices = clip_indices(start, clip_len, frame_interval)
    lo, hi = shard_range(clip_len, shard)
    return read_frames(path, indices[lo:hi], size=size, fmt=fmt, backend=backend, threads=threads, stats=stats)
