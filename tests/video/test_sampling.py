"""sample_clips: mmaction2's SampleFrames (train offsets inside segments, uniform test clips, loop and
repeat_last for short videos), drawn from the generator it is given."""
from __future__ import annotations

import numpy as np
import pytest

from nonlocal_dist.video import clip_rng, sample_clips


def test_training_offsets_fall_in_their_segments_and_follow_the_generator():
    frames = sample_clips(100, 8, 2, num_clips=3, rng=clip_rng(0, 1, 7))
    assert frames.shape == (3, 8)
    avg = (100 - 16 + 1) // 3
    for c in range(3):
        assert c * avg <= frames[c, 0] < (c + 1) * avg
        assert (np.diff(frames[c]) == 2).all()
    assert np.array_equal(frames, sample_clips(100, 8, 2, num_clips=3, rng=clip_rng(0, 1, 7)))
    draws = {tuple(sample_clips(100, 8, 2, rng=clip_rng(0, epoch, 7))[0]) for epoch in range(10)}
    assert len(draws) > 1  # another epoch, another offset


def test_test_mode_is_uniform_and_centred():
    assert sample_clips(100, 8, 2, test_mode=True).tolist() == [list(range(42, 58, 2))]  # (100 - 16) // 2
    three = sample_clips(100, 8, 2, num_clips=3, test_mode=True)
    assert three[:, 0].tolist() == [0, 42, 84]
    assert sample_clips(10, 1, num_clips=2, test_mode=True).ravel().tolist() == [2, 7]  # 2D: segment middles


def test_short_video_loops_or_repeats_the_last_frame():
    assert sample_clips(5, 4, 2, test_mode=True).tolist() == [[0, 2, 4, 1]]
    assert sample_clips(5, 4, 2, test_mode=True, out_of_bound="repeat_last").tolist() == [[0, 2, 4, 4]]
    assert sample_clips(3, 6, rng=clip_rng(0, 0, 0)).tolist() == [[0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_frames": 0}, "num_frames must be an int >= 1, got 0"),
    ({"clip_len": 2.5}, "clip_len must be an int"),
    ({"out_of_bound": "clip"}, "out_of_bound must be one of"),
    ({"test_mode": False}, "pass rng"),
])
def test_bad_arguments(kwargs, match):
    args = {"num_frames": 10, "clip_len": 4, "test_mode": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_clips(**args)
