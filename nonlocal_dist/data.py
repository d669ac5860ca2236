"""Digit clips: real handwritten digits (scikit-learn's digits set) placed so that the label needs
long-range spacetime reasoning.

A clip has ``frames`` blank frames of a ``size``×``size`` canvas; two random frames at least
``min_gap`` apart each show one 8×8 digit at a random place. The label is 1 when the two digits are
the same class, else 0 (balanced). Per-frame features pooled into a linear head see only the *sum*
of the two digits' features, from which "same or different" is not linearly readable: the two
digits, far apart in time and space, must meet (a non-local block) before the pooling. With
temporal convolutions (I3D), a ``min_gap`` at least their temporal receptive field keeps the
digits apart until a non-local block joins them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _digit_images(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(0.8 * len(order))  # held-out clips use held-out handwriting
    index = order[:cut] if split == "train" else order[cut:]
    return digits.images[index].astype(np.float32) / 16.0, digits.target[index]


def digit_clips(
    num_clips: int, split: str = "train", frames: int = 8, size: int = 24, seed: int = 0, classes: int = 10,
    min_gap: int = 1,
):
    """Clips (num_clips, 1, frames, size, size) float32 and labels (num_clips,) int64, deterministic.

    Digits are drawn from the first ``classes`` classes (2 to 10); their frames t1, t2 (in random
    order) satisfy |t1 - t2| >= ``min_gap`` (1 to frames - 1).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if frames < 2 or size < 8 or not 2 <= classes <= 10:
        raise ValueError(f"need frames >= 2, size >= 8, 2 <= classes <= 10; got {frames}, {size}, {classes}")
    if not 1 <= min_gap < frames:
        raise ValueError(f"min_gap must be between 1 and frames - 1 = {frames - 1}, got {min_gap}")
    images, labels = _digit_images(split, seed)
    by_class = [np.flatnonzero(labels == c) for c in range(classes)]
    rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
    clips = np.zeros((num_clips, 1, frames, size, size), dtype=np.float32)
    targets = rng.integers(0, 2, num_clips)
    pairs = [(a, b) for a in range(frames) for b in range(frames) if abs(a - b) >= min_gap]
    for i in range(num_clips):
        first = rng.integers(classes)
        second = first if targets[i] else rng.choice([c for c in range(classes) if c != first])
        # min_gap 1 keeps the draw of the clips before min_gap existed (same clips for the same seed).
        where = rng.choice(frames, 2, replace=False) if min_gap == 1 else pairs[rng.integers(len(pairs))]
        for frame, digit_class in zip(where, (first, second)):
            y, x = rng.integers(0, size - 7, 2)
            clips[i, 0, frame, y : y + 8, x : x + 8] = images[rng.choice(by_class[digit_class])]
    return torch.from_numpy(clips), torch.from_numpy(targets.astype(np.int64))


DIGIT_VIDEO_SCALE = 240  # a pixel k/16 is stored as 15k; (15k - 0) / 240 gives k/16 back exactly


def write_digit_videos(out_dir, num_clips: int, split: str = "train", frames: int = 8, size: int = 24, seed: int = 0,
                       classes: int = 10, min_gap: int = 1) -> Path:
    """``digit_clips`` written once as real video files, ``out_dir/{split}/{i:05d}.mkv`` (FFV1, lossless
    8-bit gray, every frame a keyframe), and an mmaction2 annotation file ``out_dir/{split}.txt``
    (``path label`` lines); returns the annotation file. Read back with ``VideoClipDataset(...,
    fmt="gray", transform=ClipTransform(mean=(0,), std=(DIGIT_VIDEO_SCALE,)))``: the in-memory clips, bit
    for bit. A complete earlier write of the same clips is reused."""
    import av

    clips, labels = digit_clips(num_clips, split, frames, size, seed, classes, min_gap)
    out_dir = Path(out_dir)
    ann = out_dir / f"{split}.txt"
    stamp = out_dir / f".{split}.{num_clips}-{frames}-{size}-{seed}-{classes}-{min_gap}.done"
    if ann.is_file() and stamp.is_file():
        return ann
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    pixels = (clips[:, 0] * 16).round().to(torch.uint8).mul_(DIGIT_VIDEO_SCALE // 16).numpy()  # (N, T, H, W)
    lines = []
    for i in range(num_clips):
        name = f"{split}/{i:05d}.mkv"
        with av.open(str(out_dir / name), "w") as container:
            stream = container.add_stream("ffv1", rate=25)
            stream.width, stream.height, stream.pix_fmt = size, size, "gray"
            stream.codec_context.gop_size = 1
            for frame in pixels[i]:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        lines.append(f"{name} {int(labels[i])}\n")
    ann.write_text("".join(lines))
    stamp.touch()
    return ann
