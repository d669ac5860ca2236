"""mmaction2's ``SampleFrames``: which frames of a video make its clips.

A clip is ``clip_len`` frames ``frame_interval`` apart (it spans ``clip_len * frame_interval``
frames). Training: ``num_clips`` segments of the video, each clip at a random offset inside its
segment. Testing: ``num_clips`` clips spread uniformly (one centred clip when ``num_clips`` is 1).
Videos shorter than a clip (mmaction2's ``out_of_bound_opt``): ``"loop"`` (the default) wraps the
frame numbers around the video, ``"repeat_last"`` repeats its last frame.
"""
from __future__ import annotations

import numpy as np

OUT_OF_BOUND = ("loop", "repeat_last")


def _train_offsets(num_frames: int, span: int, num_clips: int, rng: np.random.Generator) -> np.ndarray:
    avg_interval = (num_frames - span + 1) // num_clips
    if avg_interval > 0:
        return np.arange(num_clips) * avg_interval + rng.integers(avg_interval, size=num_clips)
    if num_frames > max(num_clips, span):
        return np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    if avg_interval == 0:
        ratio = (num_frames - span + 1.0) / num_clips
        return np.around(np.arange(num_clips) * ratio)
    return np.zeros(num_clips, dtype=np.int64)


def _test_offsets(num_frames: int, span: int, num_clips: int, clip_len: int) -> np.ndarray:
    if clip_len == 1:  # 2D recognisers: the middle frame of each segment
        interval = num_frames / num_clips
        return np.arange(num_clips) * interval + interval / 2.0
    max_offset = max(num_frames - span, 0)
    if num_clips == 1:
        return np.array([max_offset // 2])
    return np.round(np.arange(num_clips) * (max_offset / (num_clips - 1)))


def sample_clips(num_frames: int, clip_len: int, frame_interval: int = 1, num_clips: int = 1, *,
                 test_mode: bool = False, rng: np.random.Generator | None = None,
                 out_of_bound: str = "loop") -> np.ndarray:
    """Frame numbers (num_clips, clip_len) int64 of a video of ``num_frames`` frames, as mmaction2's
    ``SampleFrames``: clip c is ``offset_c + k * frame_interval``, k < clip_len, then wrapped or clamped
    (``out_of_bound``) into [0, num_frames). ``rng`` draws the training offsets (required in training;
    give every rank of a sequence-parallel group the same one)."""
    for name, value in (("num_frames", num_frames), ("clip_len", clip_len), ("frame_interval", frame_interval),
                        ("num_clips", num_clips)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if out_of_bound not in OUT_OF_BOUND:
        raise ValueError(f"out_of_bound must be one of {OUT_OF_BOUND}, got {out_of_bound!r}")
    if not test_mode and rng is None:
        raise ValueError("training sampling draws random offsets: pass rng (np.random.default_rng(...)), "
                         "the same on every rank of a group, or test_mode=True")
    span = clip_len * frame_interval
    offsets = (_test_offsets(num_frames, span, num_clips, clip_len) if test_mode
               else _train_offsets(num_frames, span, num_clips, rng))
    frames = offsets.astype(np.int64)[:, None] + np.arange(clip_len)[None, :] * frame_interval
    if out_of_bound == "loop":
        return np.mod(frames, num_frames)
    inside = frames < num_frames
    last = np.max(frames * inside, axis=1, keepdims=True)
    return np.where(inside, frames, last)
