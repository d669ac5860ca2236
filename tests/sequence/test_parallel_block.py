"""NonLocalBlock(sp_group=, shard_axis=) on real gloo ranks equals the block on the whole tensor."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from block_parity import sharded_block_failures

from nonlocal_dist import NonLocalBlock
from nonlocal_dist.sequence import shard_tensor
from nonlocal_dist.testing import run_ranks

CONFIGS = [
    ("t", None, (2, 8, 7, 5, 4)),
    ("t", {"h": 2, "w": 2}, (2, 8, 7, 5, 4)),
    ("t", {"t": 2, "h": 2}, (1, 8, 12, 5, 4)),
    ("h", {"h": 2, "w": 2}, (2, 8, 3, 12, 5)),
]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_sharded_block_equals_whole_block(world, mode):
    failures = run_ranks(sharded_block_failures, world, mode, CONFIGS, 10)
    assert not any(failures), failures


def _pooling_across_boundary(rank, world):
    block = NonLocalBlock(4, sub_sample={"t": 2}, sp_group=dist.group.WORLD, shard_axis="t")
    x = shard_tensor(torch.randn(1, 4, 7, 3, 3), "b c t h w", "t", dist.group.WORLD)  # shards 4 and 3
    try:
        block(x)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_pooling_across_shard_boundary_raises_on_every_rank():
    for message in run_ranks(_pooling_across_boundary, 2, timeout=60):
        assert "not all divisible by 2" in message, message


def _shape_mismatch(rank, world):
    block = NonLocalBlock(4, sp_group=dist.group.WORLD, shard_axis="t")
    x = torch.randn(1, 4, 3, 3, 3 + rank)  # w differs between ranks
    try:
        block(x)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_block_shape_mismatch_raises_on_every_rank():
    for message in run_ranks(_shape_mismatch, 2, timeout=180):
        assert "w per rank = [3, 4]" in message, message


def test_block_sp_arguments_validated():
    with pytest.raises(ValueError, match="need sp_group"):
        NonLocalBlock(4, shard_axis="t")
    with pytest.raises(ValueError, match="must be one of the interacting axes"):
        NonLocalBlock(4, axes="h w", sp_group=object(), shard_axis="t")

