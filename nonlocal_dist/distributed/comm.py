"""The raw collectives of this package (every c10d call goes through here): uneven gathers/scatters,
all-to-all, all-reduce and ring communicators (``RingComm`` over a process group, ``LocalComm`` for
simulated ranks in one process). Their autograd forms are in ``collectives.py``.

Every collective is started asynchronously and waited for by ``failure.wait``: a peer that fails
meanwhile makes this rank raise instead of waiting for the process group's timeout. Nothing here
knows about the non-local math; every function takes the process group explicitly.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import nonlocal_dist.distributed.failure as failure
from nonlocal_dist.distributed.shards import starts

# One-tensor collectives (named ``all_gather_into_tensor``/``reduce_scatter_tensor`` before torch 2.13).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _start(collective, *args, **kwargs):
    """Start ``collective`` asynchronously; its work handle (every c10d collective here starts so)."""
    return collective(*args, async_op=True, **kwargs)


def _run(collective, *args, **kwargs) -> None:
    """Start ``collective`` and wait for it (raising if a peer fails meanwhile)."""
    failure.wait(_start(collective, *args, **kwargs))


def all_gather_into(out: list[Tensor], x: Tensor, group) -> None:
    """``dist.all_gather``: rank r's ``x`` into ``out[r]``."""
    _run(dist.all_gather, out, x, group=group)


def broadcast_(x: Tensor, src_rank: int, group) -> None:
    """``x`` of the group's rank ``src_rank`` on every rank, in place."""
    _run(dist.broadcast, x, src=dist.get_global_rank(group, src_rank), group=group)


def all_to_all_flat(recv: Tensor, send: Tensor, recv_splits: list[int], send_splits: list[int], group) -> None:
    """``dist.all_to_all_single`` of flat buffers: ``send_splits[q]`` elements to rank q."""
    _run(dist.all_to_all_single, recv, send, recv_splits, send_splits, group=group)


def _end_to_end(pieces: list[Tensor]) -> Tensor:
    """One flat buffer holding ``pieces`` (one dtype and device, any strides) laid end to end, each
    copied once: a collective's rank-major send buffer."""
    out = pieces[0].new_empty(sum(p.numel() for p in pieces))
    offset = 0
    for piece in pieces:
        out[offset : offset + piece.numel()].view(piece.shape).copy_(piece)
        offset += piece.numel()
    return out


def _one_buffer(parts: list[Tensor]) -> bool:
    """Whether ``parts`` can share one collective's buffers (one dtype and device); else the callers
    move them one collective each, never casting."""
    return all(p.dtype == parts[0].dtype and p.device == parts[0].device for p in parts)


def all_to_all_positions(chunks: list[Tensor], recv_lengths: list[int], rest: torch.Size, group) -> list[Tensor]:
    """Send ``chunks[q]`` (n_q, *rest) to rank q; receive (recv_lengths[q], *rest) from each rank q.
    One ``all_to_all_single`` of the chunks laid end to end (none in a group of one)."""
    if len(chunks) == 1:  # a group of one: nothing moves
        return [chunks[0].new_empty((0, *rest))]
    per_position = rest.numel()
    send = _end_to_end(chunks)
    out_splits = [n * per_position for n in recv_lengths]
    recv = send.new_empty(sum(out_splits))
    all_to_all_flat(recv, send, out_splits, [c.numel() for c in chunks], group)
    return [piece.view(n, *rest) for piece, n in zip(recv.split(out_splits), recv_lengths)]


def _pad_to(x: Tensor, size: int, dim: int) -> Tensor:
    if x.shape[dim] == size:
        return x.contiguous()
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def _leading(shape: torch.Size | list[int], dim: int) -> int:
    """Number of slabs before ``dim``: slices along ``dim`` of a contiguous tensor are contiguous when 1."""
    return math.prod(shape[:dim])


class Started:
    """A collective started and not yet waited for: ``wait()`` waits (raising if a peer fails meanwhile,
    ``failure.wait``) and returns its result. Every rank must start the same collectives in the same
    order, as for any collective; between the start and the wait, this rank computes. ``work`` None:
    ``finish`` waits for the collectives it holds (several started as one)."""

    __slots__ = ("_work", "_finish")

    def __init__(self, work: dist.Work | None, finish: Callable[[], object]) -> None:
        self._work, self._finish = work, finish

    def wait(self):
        if self._work is not None:
            failure.wait(self._work)
        return self._finish()


def all_gather_varlen(x: Tensor, sizes: list[int], dim: int, group) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``; rank r's shard has ``sizes[r]`` entries there.

    Memory: even shards are received straight into their slices of the result (the collective's own
    buffer aside); uneven ones into one buffer of shards padded to the longest, then copied out.
    """
    return start_all_gather_varlen(x, sizes, dim, group).wait()


def start_all_gather_varlen(x: Tensor, sizes: list[int], dim: int, group) -> Started:
    """``all_gather_varlen`` started: its ``wait()`` gives the concatenated tensor."""
    dim = dim % x.dim()
    if min(sizes) == max(sizes):
        shape = list(x.shape)
        shape[dim] = sum(sizes)
        out = x.new_empty(shape)
        return Started(_start(dist.all_gather, list(out.split(sizes, dim=dim)), x.contiguous(), group=group), lambda: out)
    padded = _pad_to(x, max(sizes), dim)
    shard_shape = padded.shape
    parts = padded.new_empty((len(sizes) * shard_shape[0], *shard_shape[1:]))  # rank-major, as the collective fills it
    work = _start(_all_gather, parts, padded, group=group)
    del padded

    def finish() -> Tensor:
        pieces = parts.view(len(sizes), *shard_shape)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(pieces, sizes)], dim=dim)

    return Started(work, finish)


def reduce_scatter_varlen(x: Tensor, sizes: list[int], dim: int, group) -> Tensor:
    """Sum ``x`` (the full length ``sum(sizes)`` along ``dim``) over ranks; return this rank's shard."""
    return reduce_scatter_parts([x], sizes, dim, group)[0]


def reduce_scatter_parts(parts: list[Tensor], sizes: list[int], dim: int, group) -> list[Tensor]:
    """``reduce_scatter_varlen`` of several tensors (each of full length ``sum(sizes)`` along ``dim``),
    in one collective where they share a dtype (and, off the CPU, a shape), else one each.

    CPU tensors (gloo): one ``all_to_all_single`` sends rank q its slices, unpadded, and this rank
    adds the P - 1 slices it receives to its own: 0.54-0.69x the time of gloo's own reduce-scatter
    on 2 ranks, 0.14-0.74x on 3, for 24 KiB to 1.5 MiB shards (``scripts/bench_collectives.py``).
    Memory beyond the inputs: the other ranks' slices copied into one send buffer, the P - 1 received
    slices, and the result (at P = 2 with one part, the received slice itself: two half-length
    buffers, where gloo's reduce-scatter copies its whole input).
    Other devices (NCCL): one reduce-scatter over one rank-major copy of the parts, zero-padded to
    the longest slice, plus this rank's (padded) shards.
    """
    first = parts[0]
    if not _one_buffer(parts):
        return [reduce_scatter_parts([p], sizes, dim, group)[0] for p in parts]
    dims = [dim % p.dim() for p in parts]
    if first.device.type != "cpu":
        if all(p.shape == first.shape for p in parts):
            return _reduce_scatter_padded(parts, sizes, dims[0], group)
        return [_reduce_scatter_padded([p], sizes, d, group)[0] for p, d in zip(parts, dims)]
    world, rank = len(sizes), dist.get_rank(group)
    if world == 1:
        return list(parts)
    slices = [[p.narrow(d, s, n) for s, n in zip(starts(sizes), sizes)] for p, d in zip(parts, dims)]
    others = [q for q in range(world) if q != rank]  # this rank's own slices stay where they are
    send = _end_to_end([s[q] for q in others for s in slices])
    mine = [list(s[rank].shape) for s in slices]
    per_rank = sum(math.prod(m) for m in mine)
    recv = send.new_empty((world - 1) * per_rank)
    all_to_all_flat(recv, send, [0 if q == rank else per_rank for q in range(world)],
                    [0 if q == rank else sum(s[q].numel() for s in slices) for q in range(world)], group)
    del send
    if world == 2 and len(parts) == 1:  # the one received slice takes the sum in place
        return [recv.view(mine[0]).add_(slices[0][rank])]
    received = recv.view(world - 1, per_rank).split([math.prod(m) for m in mine], dim=1)
    return [own[rank] + r.reshape(world - 1, *m).sum(0) for own, r, m in zip(slices, received, mine)]


def _reduce_scatter_padded(parts: list[Tensor], sizes: list[int], dim: int, group) -> list[Tensor]:
    """One reduce-scatter of parts of one shape: each part's slices copied straight into one
    rank-major buffer (rank q's slices of every part, zero-padded to the longest), plus this rank's
    (padded) shards."""
    longest = max(sizes)
    shard_shape = list(parts[0].shape)
    shard_shape[dim] = longest
    make = parts[0].new_empty if min(sizes) == longest else parts[0].new_zeros
    stacked = make((len(sizes), len(parts), *shard_shape))
    for q, (start, size) in enumerate(zip(starts(sizes), sizes)):
        for i, part in enumerate(parts):
            stacked[q, i].narrow(dim, 0, size).copy_(part.narrow(dim, start, size))
    out = parts[0].new_empty((len(parts), *shard_shape))
    _run(_reduce_scatter, out.view(-1), stacked.view(-1), group=group)
    return [o.narrow(dim, 0, sizes[dist.get_rank(group)]) for o in out]


def all_to_all_varlen(x: Tensor, send_dim: int, send_sizes: list[int], recv_dim: int, recv_sizes: list[int], group) -> Tensor:
    """Split ``x`` along ``send_dim`` (``send_sizes[s]`` entries to rank s); concatenate what every rank
    sends here along ``recv_dim`` (``recv_sizes[s]`` entries from rank s). One ``all_to_all_single``.

    E.g. positions -> heads: x (B, H, L_r, c), send_dim 1 (H/P heads each), recv_dim 2 (L_s each)
    gives (B, H/P, Σ L, c). The send buffer is ``x`` itself when its slices are contiguous, else one
    copy; the result is the receive buffer itself when its pieces are adjacent, else one copy.
    """
    return all_to_all_parts([x], send_dim, [send_sizes], recv_dim, [recv_sizes], group)[0]


def all_to_all_parts(parts: list[Tensor], send_dim: int, send_sizes: list[list[int]], recv_dim: int,
                     recv_sizes: list[list[int]], group) -> list[Tensor]:
    """``all_to_all_varlen`` of several tensors of one rank count in one collective (one each where
    their dtypes or devices differ): part i
    is split by ``send_sizes[i]`` and assembled from ``recv_sizes[i]``. The send buffer holds every
    part's slice for rank 0, then rank 1's, ... (one copy, none for one part whose slices are
    adjacent); each part comes out of the receive buffer by one copy (none for one part whose pieces
    are adjacent)."""
    world = len(send_sizes[0])
    if world == 1:  # a group of one: nothing moves
        return list(parts)
    first = parts[0]
    if not _one_buffer(parts):
        return [all_to_all_parts([p], send_dim, [s], recv_dim, [r], group)[0]
                for p, s, r in zip(parts, send_sizes, recv_sizes)]
    rank = dist.get_rank(group)
    send_dim, recv_dim = send_dim % first.dim(), recv_dim % first.dim()
    pieces = [p.split(s, dim=send_dim) for p, s in zip(parts, send_sizes)]
    if len(parts) == 1 and first.is_contiguous() and _leading(first.shape, send_dim) == 1:
        send = first.reshape(-1)
    else:
        send = _end_to_end([pc[q] for q in range(world) for pc in pieces])
    # what rank s sends here: part i's piece with this rank's send slice and rank s's receive length
    shapes = []
    for p, sent, received in zip(parts, send_sizes, recv_sizes):
        shape = list(p.shape)
        shape[send_dim] = sent[rank]
        shapes.append([shape[:recv_dim] + [received[s]] + shape[recv_dim + 1:] for s in range(world)])
    numels = [[math.prod(shape[s]) for shape in shapes] for s in range(world)]  # [sender][part]
    recv = first.new_empty(sum(map(sum, numels)))
    all_to_all_flat(recv, send, [sum(n) for n in numels], [sum(pc[q].numel() for pc in pieces) for q in range(world)],
                    group)
    del send, pieces
    blocks = iter(recv.split([n for per_sender in numels for n in per_sender]))
    received = [[None] * len(parts) for _ in range(world)]
    for s in range(world):
        for i in range(len(parts)):
            received[s][i] = next(blocks).view(shapes[i][s])
    outs = []
    for i, shape in enumerate(shapes):
        out_shape = list(shape[0])
        out_shape[recv_dim] = sum(recv_sizes[i])
        if len(parts) == 1 and _leading(out_shape, recv_dim) == 1:
            outs.append(recv.view(out_shape))
        else:
            outs.append(torch.cat([received[s][i] for s in range(world)], dim=recv_dim))
    return outs


def all_reduce_sum(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    _run(dist.all_reduce, x, group=group)
    return x


def all_reduce_max(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    _run(dist.all_reduce, x, op=dist.ReduceOp.MAX, group=group)
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
            failure.wait(req, p2p=True)
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
