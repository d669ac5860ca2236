"""Split a tensor along one named axis of a layout across a group, and gather it back."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.distributed.comm import all_gather_into, all_gather_varlen
from nonlocal_dist.layout import axis_dims


def shard_tensor(x: Tensor, layout: str, axis: str, group) -> Tensor:
    """This rank's contiguous slice of ``x`` along ``axis`` (uneven when the size does not divide; empty on
    the last ranks when the axis is shorter than the group)."""
    (dim,) = axis_dims(layout, (axis,), x.dim())
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return torch.tensor_split(x, world, dim=dim)[rank].contiguous()


def gather_tensor(x: Tensor, layout: str, axis: str, group) -> Tensor:
    """Concatenate every rank's slice along ``axis`` (slices may differ in length). Not differentiable."""
    (dim,) = axis_dims(layout, (axis,), x.dim())
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    all_gather_into(sizes, size, group)
    return all_gather_varlen(x.contiguous(), [int(s) for s in sizes], dim=dim, group=group)
