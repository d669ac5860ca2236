"""Digit clips: real handwritten digits (scikit-learn's digits set) arranged so that the label
needs long-range spacetime reasoning.

A clip has ``frames`` frames of a ``size``×``size`` canvas; each frame shows one 8×8 digit at a
random place. One random frame is the *query*: its digit is drawn in channel 1, every other digit
in channel 0. The label is 1 when the query's digit class appears in another frame (at another
random place), else 0 (balanced). A per-frame network with global pooling and a linear head cannot
solve it: it must relate two digits far apart in time and space.
"""
from __future__ import annotations

import numpy as np
import torch


def _digit_images(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(0.8 * len(order))  # held-out clips use held-out handwriting
    index = order[:cut] if split == "train" else order[cut:]
    return digits.images[index].astype(np.float32) / 16.0, digits.target[index]


def digit_clips(num_clips: int, split: str = "train", frames: int = 8, size: int = 24, seed: int = 0):
    """Clips (num_clips, 2, frames, size, size) float32 and labels (num_clips,) int64, deterministic."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if frames < 2 or size < 8:
        raise ValueError(f"need frames >= 2 and size >= 8, got frames={frames}, size={size}")
    images, labels = _digit_images(split, seed)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = np.random.default_rng(seed + (0 if split == "train" else 10_000))
    clips = np.zeros((num_clips, 2, frames, size, size), dtype=np.float32)
    targets = rng.integers(0, 2, num_clips)
    for i in range(num_clips):
        query_frame = rng.integers(frames)
        query_class = rng.integers(10)
        classes = rng.choice([c for c in range(10) if c != query_class], frames)
        if targets[i]:
            classes[rng.choice([f for f in range(frames) if f != query_frame])] = query_class
        classes[query_frame] = query_class
        for f in range(frames):
            image = images[rng.choice(by_class[classes[f]])]
            y, x = rng.integers(0, size - 7, 2)
            clips[i, int(f == query_frame), f, y : y + 8, x : x + 8] = image
    return torch.from_numpy(clips), torch.from_numpy(targets.astype(np.int64))
