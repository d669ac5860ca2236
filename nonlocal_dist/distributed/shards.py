"""Shard arithmetic: how a length is cut into contiguous, rank-ordered pieces, and where each starts.

Pure integer arithmetic (no process group): every rank computes every rank's piece alike. Uneven and
empty pieces are allowed (fewer positions than ranks leaves the last ranks empty).
"""
from __future__ import annotations

from itertools import accumulate
from typing import Sequence


def even_sizes(length: int, world: int) -> tuple[int, ...]:
    """Contiguous shard lengths, the first ``length % world`` one longer (as ``torch.tensor_split``)."""
    return tuple(length // world + (r < length % world) for r in range(world))


def split_sizes(length: int, world: int, align: int = 1) -> tuple[int, ...]:
    """Shard lengths: as even as possible, every rank but the last a multiple of ``align`` (a network's
    stride along the axis: its strided layers then start every rank on their stride grid)."""
    if align == 1:
        return even_sizes(length, world)
    units = even_sizes(length // align, world)
    sizes = [u * align for u in units]
    sizes[-1] += length - sum(sizes)
    return tuple(sizes)


def starts(sizes: Sequence[int]) -> tuple[int, ...]:
    """Each piece's first global position: ``(0, s0, s0 + s1, ...)`` for lengths ``sizes`` (rank order)."""
    return (0, *accumulate(sizes))[:-1]


def piece(sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """``(start, stop)``: the global positions rank ``rank`` holds."""
    start = sum(sizes[:rank])
    return start, start + sizes[rank]
