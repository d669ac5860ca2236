"""shard_tensor / gather_tensor reject layouts that do not describe the tensor, before any collective."""
from __future__ import annotations

import pytest
import torch

from nonlocal_dist.sequence import gather_tensor, shard_tensor


@pytest.mark.parametrize(
    "layout, axis, match",
    [("b c t h", "t", "must name each of the tensor's 3 dims once"), ("b t t", "t", "once"), ("b c t", "h", "not in layout")],
)
@pytest.mark.parametrize("fn", [shard_tensor, gather_tensor])
def test_bad_layout_raises(fn, layout, axis, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(2, 3, 4), layout, axis, group=None)
