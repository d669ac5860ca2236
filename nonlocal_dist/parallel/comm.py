"""Communication helpers for sequence parallelism: uneven gathers/scatters and ring communicators
(``RingComm`` over a process group, ``LocalComm`` for simulated ranks in one process).

Nothing here knows about the non-local math; every function takes the process group explicitly.
"""
from __future__ import annotations

from collections import deque

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
    """Send to the next rank and receive from the previous one, asynchronously (batch_isend_irecv).

    Usage per transfer: ``send_recv`` (any number), ``commit`` once, ``wait`` before reading what
    arrived; a second ``commit`` before ``wait`` raises. Empty tensors are not sent: both ends know
    the shape, so the receiver gets an empty buffer without a message.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []
        self._in_flight = False

    def send_recv(self, send: Tensor, recv_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Queue sending ``send`` to the next rank and receiving a tensor of ``recv_shape``."""
        recv = send.new_empty(recv_shape)
        if send.numel():
            self._ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group))
        if recv.numel():
            self._ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        return recv

    def commit(self) -> None:
        """Start the queued transfers."""
        _refuse_second_commit(self._in_flight)
        self._reqs = dist.batch_isend_irecv(self._ops) if self._ops else []
        self._ops, self._in_flight = [], True

    def wait(self) -> None:
        """Block until the committed transfers are done (nothing to do when none are in flight)."""
        for req in self._reqs:
            req.wait()
        self._reqs, self._in_flight = [], False


class LocalComm:
    """``RingComm``'s interface for one of ``world`` simulated ranks in one process (``local_comms``).

    ``commit`` posts the queued tensors to this rank's outbox; ``wait`` copies the previous rank's
    oldest posted batch into the buffers ``send_recv`` returned, as a real receive fills them. A
    driver must run every rank up to its ``wait`` before any rank passes it (``ring.run_in_lockstep``).
    """

    def __init__(self, rank: int, world: int, outboxes: list[deque[list[Tensor]]]) -> None:
        self.rank, self.world = rank, world
        self._outbox, self._inbox = outboxes[rank], outboxes[(rank - 1) % world]
        self._sends: list[Tensor] = []
        self._recvs: list[Tensor] = []
        self._pending: list[Tensor] | None = None

    def send_recv(self, send: Tensor, recv_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Queue handing ``send`` to the next rank and receiving a tensor of ``recv_shape``."""
        recv = send.new_empty(recv_shape)
        self._sends.append(send)
        self._recvs.append(recv)
        return recv

    def commit(self) -> None:
        """Post the queued tensors for the next rank."""
        _refuse_second_commit(self._pending is not None)
        self._outbox.append(self._sends)
        self._pending, self._sends, self._recvs = self._recvs, [], []

    def wait(self) -> None:
        """Fill the buffers of the committed receives from the previous rank's posted batch."""
        if self._pending is None:
            return
        if not self._inbox:
            raise RuntimeError(f"simulated rank {self.rank} waits for a batch that rank {(self.rank - 1) % self.world} "
                               "has not posted: the ranks were not run in lockstep")
        sent = self._inbox.popleft()
        for recv, tensor in zip(self._pending, sent, strict=True):
            recv.copy_(tensor)
        self._pending = None


def local_comms(world: int) -> list[LocalComm]:
    """One ``LocalComm`` per simulated rank of a ring of ``world``, linked rank r -> r + 1."""
    outboxes: list[deque[list[Tensor]]] = [deque() for _ in range(world)]
    return [LocalComm(rank, world, outboxes) for rank in range(world)]


def _refuse_second_commit(in_flight: bool) -> None:
    if in_flight:
        raise RuntimeError("commit() called again before wait(): the transfers already in flight would be "
                           "overwritten; call wait() first")
