"""Communication helpers for sequence parallelism: uneven gathers/scatters and a ring communicator.

Nothing here knows about the non-local math; every function takes the process group explicitly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _pad_to(x: Tensor, size: int, dim: int) -> Tensor:
    if x.shape[dim] == size:
        return x.contiguous()
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def all_gather_varlen(x: Tensor, sizes: list[int], dim: int, group) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; rank r's shard has ``sizes[r]`` entries there."""
    longest = max(sizes)
    padded = _pad_to(x, longest, dim)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def reduce_scatter_varlen(x: Tensor, sizes: list[int], dim: int, group) -> Tensor:
    """Sum ``x`` (the full length ``sum(sizes)`` along ``dim``) over ranks; return this rank's shard."""
    longest = max(sizes)
    chunks = _chunks(x, sizes, dim)
    stacked = torch.cat([_pad_to(c, longest, dim) for c in chunks], dim=dim).contiguous()
    out_shape = list(x.shape)
    out_shape[dim] = longest
    out = x.new_empty(out_shape)
    if dim != 0:  # reduce_scatter_tensor splits along dim 0
        stacked = stacked.movedim(dim, 0).contiguous()
        out = out.movedim(dim, 0).contiguous()
    dist.reduce_scatter_tensor(out, stacked, group=group)
    if dim != 0:
        out = out.movedim(0, dim)
    return out.narrow(dim, 0, sizes[dist.get_rank(group)])


def _chunks(x: Tensor, sizes: list[int], dim: int) -> list[Tensor]:
    return list(torch.split(x, sizes, dim=dim))


def all_reduce_sum(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_reduce_max(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


class RingComm:
    """Send to the next rank and receive from the previous one, asynchronously (batch_isend_irecv)."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []

    def send_recv(self, send: Tensor, recv_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Queue sending ``send`` to the next rank and receiving a tensor of ``recv_shape``."""
        recv = send.new_empty(recv_shape)
        self._ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group))
        self._ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        return recv

    def commit(self) -> None:
        self._reqs = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []
