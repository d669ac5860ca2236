"""Digit clips: two digits at least min_gap frames apart, deterministic, balanced labels."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from nonlocal_dist.data import digit_clips  # noqa: E402


@pytest.mark.parametrize("frames, min_gap", [(4, 1), (16, 9), (16, 15)])
def test_two_digits_at_least_min_gap_apart(frames, min_gap):
    clips, labels = digit_clips(200, "train", frames, 16, seed=0, classes=3, min_gap=min_gap)
    assert clips.shape == (200, 1, frames, 16, 16) and labels.shape == (200,)
    inked = clips.abs().sum((1, 3, 4)) > 0  # (clips, frames)
    assert (inked.sum(1) == 2).all()
    gaps = [int(torch.nonzero(row).flatten().diff()) for row in inked]
    assert min(gaps) >= min_gap
    assert max(gaps) == frames - 1  # the whole range of gaps is drawn, the largest too
    assert 0.35 < labels.float().mean() < 0.65


def test_deterministic_and_held_out_differs():
    first, second = digit_clips(20, "test", 16, 16, min_gap=9), digit_clips(20, "test", 16, 16, min_gap=9)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], digit_clips(20, "train", 16, 16, min_gap=9)[0])


@pytest.mark.parametrize("min_gap", [0, 16])
def test_min_gap_out_of_range(min_gap):
    with pytest.raises(ValueError, match="min_gap must be between 1 and frames - 1 = 15"):
        digit_clips(2, "train", 16, 16, min_gap=min_gap)
