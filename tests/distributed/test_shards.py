"""Shard arithmetic (``distributed/shards.py``), the one home of split sizes and offsets, against torch's
own ``tensor_split`` and a brute-force walk over the pieces."""
from __future__ import annotations

import pytest
import torch

from nonlocal_dist.distributed.shards import even_sizes, piece, split_sizes, starts


@pytest.mark.parametrize("length", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_even_sizes_are_tensor_splits_and_pieces_tile_the_axis(length, world):
    sizes = even_sizes(length, world)
    assert list(sizes) == [len(p) for p in torch.tensor_split(torch.arange(length), world)]
    covered = []
    for rank in range(world):
        lo, hi = piece(sizes, rank)
        assert lo == starts(sizes)[rank] and hi - lo == sizes[rank]
        covered += range(lo, hi)
    assert covered == list(range(length))


@pytest.mark.parametrize("length, world, align", [(16, 3, 2), (17, 3, 4), (8, 3, 2), (5, 4, 2), (3, 2, 4)])
def test_split_sizes_put_every_boundary_on_the_stride_grid(length, world, align):
    sizes = split_sizes(length, world, align)
    assert sum(sizes) == length and len(sizes) == world and min(sizes) >= 0
    assert all(s % align == 0 for s in starts(sizes))


def test_starts_of_uneven_and_empty_pieces():
    assert starts((4, 0, 3, 1)) == (0, 4, 4, 7)
    assert piece((4, 0, 3, 1), 1) == (4, 4)
