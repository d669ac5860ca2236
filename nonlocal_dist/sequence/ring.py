"""Ring strategy for the softmax modes: key blocks travel around the group, merged by log-sum-exp.

Forward: each step computes this rank's queries against the key block in hand while the next block
is already in flight; partial outputs merge in place. Backward: a second ring; every block's
gradient uses the *global* output and LSE, dq accumulates locally and dk/dv travel with their block
back home, chunk by chunk. Memory per rank: O((N + M)/P · d); at N = M the backward holds about
seven (N/P)·d tensors (out, dout, dq, and the block's k, v, dk, dv).

One schedule serves two drivers. ``ring_forward``/``ring_backward`` are one rank's schedule, written
against a comm object (``send_recv``/``commit``/``wait``) and yielding just before each ``wait``:
``ring_attention`` runs one rank over a process group (``RingComm``), ``local_ring_attention`` runs
every rank of a simulated ring in one process (``LocalComm``), step by step in lockstep, so the
ring's compute can be timed and tested on one device with exactly the kernels, merges and chunking
of each rank. A rank with no queries or a block with no keys skips its kernel calls but still
takes part in every transfer.

The schedule never chooses kernels: the entry points ask ``backends.select_block_kernel`` once
(``backend=``) and pass the per-block kernel's name down.
"""
from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor

from nonlocal_dist.backends import OpInputs, select_block_kernel
from nonlocal_dist.conventions import accumulation_dtype
from nonlocal_dist.distributed.comm import LocalComm, RingComm, local_comms
from nonlocal_dist.distributed.shards import even_sizes
from nonlocal_dist.kernels import attention_backward, attention_forward, preferred_chunk
from nonlocal_dist.kernels.softmax import in_layout_of, kernel_input
from nonlocal_dist.sequence.graph import refuse_graph_of_backward
from nonlocal_dist.sequence.merge import merge_partial

Schedule = Generator[None, None, tuple]


def _block_shape(x: Tensor, positions: int) -> tuple[int, ...]:
    return (*x.shape[:2], positions, x.shape[-1])


def ring_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, comm: RingComm | LocalComm, m_sizes: list[int], kernel: str
) -> Schedule:
    """One rank's forward schedule; returns the output (B, H, N_r, dv) in q's dtype and the global LSE (B, H, N_r).

    k and v travel as they are (two messages per step, no packed copy): the rank holds the block in
    hand and the one arriving, 2 (M/P)(d + dv) values. ``kernel``: the per-block kernel every call
    runs (``kernels.softmax.attention_forward``), as ``backends.select_block_kernel`` chose it.
    """
    out = lse = None
    for step in range(comm.world):
        last = step == comm.world - 1
        if not last:
            origin = (comm.rank - step - 1) % comm.world
            next_k = comm.send_recv(k, _block_shape(k, m_sizes[origin]))
            next_v = comm.send_recv(v, _block_shape(v, m_sizes[origin]))
            comm.commit()
        if q.shape[-2] and k.shape[-2]:
            block_out, block_lse = attention_forward(q, k, v, scale, kernel)
            out, lse = merge_partial(out, lse, block_out, block_lse)
            del block_out, block_lse
        if not last:
            yield
            comm.wait()
            k, v = next_k, next_v
    if out is None:  # no queries here (the group's keys are never all empty: the API checks that)
        acc = accumulation_dtype(q.dtype)
        out, lse = q.new_zeros(_block_shape(v, q.shape[-2]), dtype=acc), q.new_zeros(q.shape[:-1], dtype=acc)
    return out.to(q.dtype), lse


def _chunk_count(length: int, chunk: int | None) -> int:
    return 1 if chunk is None else -(-length // chunk)


def ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
    comm: RingComm | LocalComm, m_sizes: list[int], kernel: str,
) -> Schedule:
    """One rank's backward schedule; returns (dq, dk, dv) for its shards, dk/dv summed over every rank's queries.

    Step s: the block of rank ``r - s`` is in hand, cut into the same number of position chunks on
    every rank, each with the gradient its keys have gathered so far. Kernel calls take one query
    chunk and one key chunk, so their outputs are chunk-sized and are added in place. As soon as a
    key chunk is done it leaves for the next rank (keys, values and their gradient so far) while the
    same chunk of the next block arrives and the following chunk is computed: transfers overlap
    computation, and the rank holds one block (k, v, dk, dv) plus one chunk in flight. After the
    last step only the gradients travel, to the block's owner. Chunk size: ``kernels.preferred_chunk``
    (CPU: memory-bounded; CUDA: whole blocks, one kernel call per block and step).
    """
    if comm.world == 1:  # nothing travels (a group's queries are never all empty: the API checks that)
        return attention_backward(dout, q, k, v, out, lse, scale, kernel)
    chunk = preferred_chunk(q.device)  # CPU: memory-bounded chunks; GPU: whole blocks
    acc = accumulation_dtype(q.dtype)
    nonempty = [m for m in m_sizes if m]
    count = max(1, min(min(nonempty), _chunk_count(max(nonempty), chunk)))  # key chunks per block, same on every rank
    q_sizes = even_sizes(q.shape[-2], _chunk_count(q.shape[-2], chunk)) if q.shape[-2] else []
    dq = torch.zeros_like(q, dtype=acc)  # in q's layout
    queries = list(zip(dout.split(q_sizes, -2), q.split(q_sizes, -2), out.split(q_sizes, -2),
                       lse.split(q_sizes, -1), dq.split(q_sizes, -2)))
    own = even_sizes(m_sizes[comm.rank], count)
    block = [[kc, vc, None, None] for kc, vc in zip(k.split(own, -2), v.split(own, -2))]
    for step in range(comm.world):
        last = step == comm.world - 1
        incoming = even_sizes(m_sizes[(comm.rank - step - 1) % comm.world], count)
        arrived = []
        for j in range(count):
            kc, vc, dkc, dvc = block[j]
            block[j] = None  # the chunk lives on only in the transfer below
            if kc.shape[-2]:
                for dout_i, q_i, out_i, lse_i, dq_i in queries:
                    dq_ij, dk_ij, dv_ij = attention_backward(
                        dout_i, q_i, kc, vc, out_i, lse_i.contiguous(), scale, kernel)
                    dq_i.add_(dq_ij)
                    if dkc is None:
                        dkc, dvc = dk_ij.to(acc), dv_ij.to(acc)
                    else:
                        dkc.add_(dk_ij)
                        dvc.add_(dv_ij)
                    del dq_ij, dk_ij, dv_ij
            if dkc is None:  # no kernel ran on this chunk yet: its gradient so far is zero
                dkc, dvc = kc.new_zeros(kc.shape, dtype=acc), vc.new_zeros(vc.shape, dtype=acc)
            yield
            comm.wait()  # the previous chunk's transfer: its buffers go
            leaving = (dkc, dvc) if last else (kc, vc, dkc, dvc)
            arrived.append([comm.send_recv(t, _block_shape(t, incoming[j])) for t in leaving])
            comm.commit()
            del kc, vc, dkc, dvc, leaving
        yield
        comm.wait()
        block = arrived
    dk = torch.cat([c[0] for c in block], -2)
    dv = torch.cat([c[1] for c in block], -2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def run_alone(schedule: Schedule):
    """Drive one rank's schedule to its end (real transfers: its yields need nothing) and return its result."""
    while True:
        try:
            next(schedule)
        except StopIteration as stop:
            return stop.value


def run_in_lockstep(schedules: list[Schedule]) -> list:
    """Drive simulated ranks in rounds: each runs up to its next ``wait`` before any rank passes it.

    Every rank makes the same sequence of ``commit``/``wait`` calls, so when a rank waits, the
    previous rank has already posted the matching batch. Returns each rank's result in rank order.
    """
    results: list = [None] * len(schedules)
    running = list(range(len(schedules)))
    while running:
        for rank in list(running):
            try:
                next(schedules[rank])
            except StopIteration as stop:
                results[rank] = stop.value
                running.remove(rank)
    return results


def _block_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> str:
    # Both softmax modes run the same kernels (gaussian is phi = theta).
    return select_block_kernel(OpInputs(q, k, v, "embedded_gaussian", scale, None), backend, "ring")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, m_sizes, kernel):
        out, lse = run_alone(ring_forward(q, k, v, scale, RingComm(group), m_sizes, kernel))
        out = in_layout_of(out, q)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.m_sizes, ctx.kernel = scale, group, m_sizes, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_graph_of_backward("ring")
        q, k, v, out, lse = ctx.saved_tensors
        dout, out = kernel_input(dout, ctx.kernel), kernel_input(out, ctx.kernel)
        schedule = ring_backward(dout, q, k, v, out, lse, ctx.scale, RingComm(ctx.group), ctx.m_sizes, ctx.kernel)
        dq, dk, dv = run_alone(schedule)
        return dq, dk, dv, None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group, m_sizes: list[int], backend: str = "auto"
) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` over the keys of every rank; q (B, H, N_r, d) -> (B, H, N_r, dv).

    ``m_sizes[r]`` is the number of key positions held by rank r of ``group``. ``backend``: ``auto``,
    ``sdpa`` or ``blocked``, the per-block kernels (``backends.select_block_kernel``). The output is
    stored positions-first where q is (``kernels.softmax.in_layout_of``); q goes to the kernel without
    a copy where the kernel reads its strides (k and v travel, so they are made contiguous).
    """
    kernel = _block_kernel(q, k, v, scale, backend)
    return _RingAttention.apply(kernel_input(q, kernel), k.contiguous(), v.contiguous(), scale, group, m_sizes, kernel)


def _shards(x: Tensor, world: int) -> list[Tensor]:
    return [t.contiguous() for t in x.split(even_sizes(x.shape[-2], world), -2)]


class _LocalRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, world, kernel):
        qs, ks, vs = _shards(q, world), _shards(k, world), _shards(v, world)
        m_sizes = list(even_sizes(k.shape[-2], world))
        comms = local_comms(world)
        schedules = [ring_forward(*qkv, scale, comm, m_sizes, kernel) for *qkv, comm in zip(qs, ks, vs, comms)]
        outs, lses = zip(*run_in_lockstep(schedules))
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.scale, ctx.world, ctx.m_sizes, ctx.kernel = scale, world, m_sizes, kernel
        return torch.cat(outs, -2)

    @staticmethod
    def backward(ctx, dout):
        refuse_graph_of_backward("ring")
        qs, ks, vs, outs, lses = (ctx.saved_tensors[i * ctx.world : (i + 1) * ctx.world] for i in range(5))
        douts = _shards(dout, ctx.world)
        comms = local_comms(ctx.world)
        schedules = [ring_backward(do, q, k, v, o, lse, ctx.scale, comm, ctx.m_sizes, ctx.kernel)
                     for do, q, k, v, o, lse, comm in zip(douts, qs, ks, vs, outs, lses, comms)]
        dqs, dks, dvs = zip(*run_in_lockstep(schedules))
        return torch.cat(dqs, -2), torch.cat(dks, -2), torch.cat(dvs, -2), None, None, None


def local_ring_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, world: int, backend: str = "auto") -> Tensor:
    """The ring of ``world`` ranks simulated in one process: ``softmax_j(scale q_i·k_j) v_j``, differentiable.

    q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) -> (B, H, N, dv). Positions are split into
    ``world`` contiguous shards (``even_sizes``; empty ones when fewer positions than ranks) and
    every simulated rank runs the distributed ring's schedule, the transfers replaced by hand-offs
    in memory: the same kernel calls, merges and chunking each rank of a real ring runs.
    ``backend``: as ``ring_attention``.
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (the number of simulated ranks), given {world!r}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"local_ring_attention needs query and key positions; given N = {q.shape[-2]}, "
                         f"M = {k.shape[-2]} (softmax over no keys is undefined)")
    return _LocalRingAttention.apply(q, k, v, scale, world, _block_kernel(q, k, v, scale, backend))
