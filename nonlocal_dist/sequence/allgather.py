"""The all-gather for the softmax modes: every rank's keys and values gathered, the fused kernel with
its log-sum-exp on this rank's queries, in one autograd node that keeps only this rank's own keys.

The forward gathers k and v (one packed all-gather where they are small,
``collectives.gather_parts``) and runs the per-block kernel (``backends.block_kernel_if_any``, as
the ring and Ulysses do) on this rank's queries against all of them. The node saves q, this rank's
k and v, the output and the log-sum-exp: not the gathered keys and values, which the backward
gathers again (one more all-gather, as Megatron's sequence parallelism re-gathers its activations
instead of keeping them), so the step keeps the keys once over the group, not once per rank. The
backward runs the kernel's backward against the whole keys and sums dk and dv over the ranks, each
keeping its own positions (one reduce-scatter, ``collectives.scatter_sum``).

A graph of the backward (``create_graph=True``) is made as the all-gather of the other modes makes
it: the keys gathered by the differentiable gather (``collectives.gather_positions``) and the
gradients recomputed by plain torch ops (``kernels.softmax.differentiable_backward``), summed over
the ranks by a reduce-scatter whose own backward gathers (``collectives.scatter_sum``).

The backward's gather need not wait in line (``RegatherAhead``): within one forward that opens a
chain (``parallelize``'s model call does), each node's backward, once done with its own whole keys,
starts the gather of the node that ran before it, which then travels while the backward of
everything between the two attentions runs. The chain is made in the forward, in the order the
nodes ran, so every rank starts the same gathers at the same point of its backward.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from nonlocal_dist.distributed.collectives import (
    gather_parts,
    gather_positions,
    scatter_sum,
    start_gather_parts,
)
from nonlocal_dist.kernels import attention_backward, attention_forward
from nonlocal_dist.kernels.softmax import differentiable_backward, finite_kernel
from nonlocal_dist.sequence.graph import zeros_in_graph


class RegatherAhead:
    """The all-gather nodes one forward records, in the order they ran (``open``/``close`` around the
    forward, nested by a stack): ``close`` links each to the one before it. A node's backward then
    starts its predecessor's gather once it is done with its own whole keys (``_start_regather``), so
    of one forward's gathers in the backward only the first is waited for in line. Nodes that run
    outside an open chain gather in their own backward, as they are.

    Two nodes are not linked across a node that gathers in line (one under saved-tensor hooks) or a
    nested model's nodes: their backward would run while the started gather travels, and two nodes'
    whole keys would be held together. The chain holds its nodes weakly until ``close`` (a forward
    interrupted before its post-hook leaves no graph alive)."""

    _open: list[RegatherAhead] = []

    def __init__(self) -> None:
        self.nodes: list[weakref.ref | None] = []  # None: a break in the chain

    @classmethod
    def open(cls) -> RegatherAhead:
        if cls._open:
            cls._open[-1].nodes.append(None)  # the nested chain's nodes run between the outer one's
        chain = cls()
        cls._open.append(chain)
        return chain

    def close(self) -> None:
        """End the forward: link its nodes, each to the one that ran before it."""
        if self in self._open:
            self._open.remove(self)
        for before, node in zip(self.nodes, self.nodes[1:]):
            ctx = node() if node is not None and before is not None else None
            if ctx is not None:
                ctx.before = before()
        self.nodes = []

    @classmethod
    def record(cls, ctx) -> None:
        """Add a node that autograd records to the innermost open chain; one under saved-tensor hooks
        (checkpointing, offloading) breaks it: reading its saved keys early would unpack them early
        (recompute a checkpointed block during the next one's backward), so it gathers in line."""
        if cls._open:
            cls._open[-1].nodes.append(weakref.ref(ctx) if _saved_tensor_hooks() is None else None)


# Private autograd queries, looked up once (torch 2.1+): the innermost saved-tensor hooks; whether the running
# backward will execute a node, and its id. Without the first every node counts as under hooks; without the
# others nothing starts ahead.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_graph_task = getattr(torch._C, "_current_graph_task_id", None)


def _saved_tensor_hooks():
    """The innermost saved-tensor hooks, or None where none run."""
    return _top_hooks(False) if _top_hooks is not None else True


def _start_regather(ctx) -> None:
    """Start the gather of ``ctx``'s own keys and values for its backward (``ctx.ahead``) where this
    backward will run it and has not yet: not for a node that a partial backward (``autograd.grad``
    with ``inputs=``) or an unused branch leaves out, nor under a graph of the backward (its gather is
    then the differentiable one). Every rank decides alike: the same graph, the same point of it."""
    if ctx is None or ctx.ahead is not None or torch.is_grad_enabled() or _will_execute is None or _graph_task is None:
        return
    if ctx.ran == _graph_task() or not _will_execute(ctx):
        return
    try:
        k, v = ctx.saved_tensors[1:3]
    except RuntimeError:  # changed in place since the forward: its own backward raises, on every rank
        return
    ctx.ahead = start_gather_parts((k, v), ctx.m_sizes, ctx.group)


class _GatheredAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, m_sizes, kernel, recorded):
        kw, vw = gather_parts((k, v), m_sizes, group)
        if q.numel() == 0:  # no queries here (or no batch rows): the backward's reduce-scatter still needs this rank
            out, lse = q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)
        else:
            kernel = finite_kernel(kernel, q, kw, vw)  # the backward reads only its gradient
            out, lse = attention_forward(q, kw, vw, scale, kernel, checked=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.m_sizes, ctx.kernel = scale, group, m_sizes, kernel
        ctx.before = ctx.ahead = ctx.ran = None
        if recorded:
            RegatherAhead.record(ctx)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ctx.ran = _graph_task() if _graph_task is not None else None
        graph = torch.is_grad_enabled()  # a graph of the backward asked for
        if graph:
            kw, vw = gather_positions(ctx.group, ctx.m_sizes, k, v)
        elif ctx.ahead is not None:
            (kw, vw), ctx.ahead = ctx.ahead.wait(), None
        else:
            kw, vw = gather_parts((k, v), ctx.m_sizes, ctx.group)
        if q.numel() == 0 and graph:  # zeros tied to what the other ranks' gradients depend on: the
            # graph's collectives (the gather and this node, again) then run on every rank, in one order
            dq, dk, dv = zeros_in_graph((q, kw, vw), (dout,))
        elif q.numel() == 0:
            dq, dk, dv = (torch.zeros_like(t) for t in (q, kw, vw))
        elif graph:
            dq, dk, dv = differentiable_backward(dout, q, kw, vw, ctx.scale)
        else:
            dq, dk, dv = attention_backward(dout, q, kw, vw, out, lse, ctx.scale, ctx.kernel, checked=True)
        del kw, vw
        dk, dv = scatter_sum(ctx.group, ctx.m_sizes, dk.to(k.dtype), dv.to(v.dtype))
        # Started once this node's whole keys are freed: it travels while the backward of everything between
        # the two attentions runs, and the two nodes' whole keys are never held together.
        _start_regather(ctx.before)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group, m_sizes: list[int],
                        kernel: str) -> Tensor:
    """``softmax_j(scale q_i·k_j) v_j`` over every rank's keys, by gathering them.

    Shapes: q (B, H, N_r, d), k (B, H, M_r, d), v (B, H, M_r, dv) -> (B, H, N_r, dv); ``m_sizes[r]``:
    rank r's key positions (uneven and empty shards run, and a rank without queries). ``kernel``: one
    of ``kernels.softmax.LSE_KERNELS``.
    """
    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _GatheredAttention.apply(q, k, v, scale, group, list(m_sizes), kernel, recorded)
