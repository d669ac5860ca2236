"""The sequence-parallel strategies: how this rank's query shard meets every rank's keys.

Each function takes validated 4-D inputs (theta (B, H, N_r, d), phi (B, H, M_r, d), g (B, H, M_r, dv))
and the key sizes of all ranks, and returns this rank's y (B, H, N_r, dv). Replicated inputs
(concat_weight) get this rank's partial gradient: the sum over ranks is the single-device gradient.

``backend=`` is honoured by every strategy or refused (``check_backend``): the ring runs the
per-block kernels of ``backends.select_block_kernel``; allgather and ulysses run the single-device
dispatch; allreduce and sorted_stats are the ``linear`` and ``sorted`` backends' formulas.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nonlocal_dist.backends import (
    CUDA_MAX_BATCH,
    OpInputs,
    block_kernel_if_any,
    dispatch,
    select_backend,
    select_block_kernel,
)
from nonlocal_dist.conventions import SOFTMAX_MODES
from nonlocal_dist.distributed.collectives import (
    all_reduce,
    gather_heads,
    gather_positions,
    scatter_heads,
)
from nonlocal_dist.kernels.sorted_concat import concat_sorted
from nonlocal_dist.sequence.allgather import allgather_attention
from nonlocal_dist.sequence.graph import zeros_in_graph
from nonlocal_dist.sequence.ring import ring_attention
from nonlocal_dist.sequence.ulysses import ulysses_attention


def ring(inputs: OpInputs, group, n_sizes: list[int], m_sizes: list[int], backend: str) -> Tensor:
    """Softmax modes: key blocks around the ring, LSE merge in float32."""
    return ring_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale, group, m_sizes, backend)


def _node_kernel(inputs: OpInputs, backend: str, head_shards: int) -> str | None:
    """The per-block kernel that the all-gather's and Ulysses' one node runs on ``inputs`` (softmax
    modes; ``backends.block_kernel_if_any``), or None (the single-device dispatch runs instead). The
    node runs its kernel unchunked: on CUDA within the grid's batch limit, B·H over ``head_shards``."""
    batch = inputs.theta.shape[0] * inputs.theta.shape[1] // head_shards
    fits = inputs.device.type != "cuda" or batch <= CUDA_MAX_BATCH
    return block_kernel_if_any(inputs, backend) if inputs.mode in SOFTMAX_MODES and fits else None


def allgather(inputs: OpInputs, group, n_sizes: list[int], m_sizes: list[int], backend: str) -> Tensor:
    """Any mode: all-gather phi and g, compute locally; backward reduce-scatters. The softmax modes,
    where the backend has a per-block kernel, run ``sequence.allgather`` (one node that keeps only
    this rank's keys and gathers them again in the backward); the others dispatch on the gathered
    keys (one node, one collective each)."""
    kernel = _node_kernel(inputs, backend, 1)
    if kernel is not None:
        return allgather_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale, group, m_sizes, kernel)
    phi, g = gather_positions(group, m_sizes, inputs.phi, inputs.g)
    if inputs.theta.shape[-2] == 0:  # no queries here, but the backward's reduce-scatter still needs this rank
        return _NoQueries.apply(inputs.theta, phi, g, inputs.concat_weight)
    return dispatch(OpInputs(inputs.theta, phi, g, inputs.mode, inputs.scale, inputs.concat_weight), backend)


class _NoQueries(torch.autograd.Function):
    """y (B, H, 0, dv) of a rank without queries, tied to the gathered keys so that its backward runs
    (zero gradients) and the collectives behind them match on every rank. Where a graph of the
    backward is recorded (``create_graph=True``), the zeros are tied to theta, the gathered keys and
    the gradient, so that the second pass runs the same collectives here as on the other ranks."""

    @staticmethod
    def forward(ctx, theta, phi, g, concat_weight):
        ctx.save_for_backward(theta, phi, g, concat_weight)
        return g.new_empty((*theta.shape[:-1], g.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return zeros_in_graph(saved, (grad,))
        return tuple(None if t is None else torch.zeros_like(t) for t in saved)


def ulysses(inputs: OpInputs, group, n_sizes: list[int], m_sizes: list[int], backend: str) -> Tensor:
    """Any mode, heads divisible by the group size: all-to-all positions -> heads, local op, back.
    The softmax modes, where the backend has a per-block kernel (``backends.block_kernel_if_any``),
    run ``sequence.ulysses`` (one node; two collectives each way where q, k and v are small, the
    attention output kept once); the others dispatch on head shards."""
    world = torch.distributed.get_world_size(group)
    kernel = _node_kernel(inputs, backend, world)
    if kernel is not None:
        return ulysses_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale, group, n_sizes, m_sizes, kernel)
    rank = torch.distributed.get_rank(group)
    theta, phi, g = scatter_heads(group, [n_sizes, m_sizes, m_sizes], inputs.theta, inputs.phi, inputs.g)
    w = inputs.concat_weight
    if w is not None and w.dim() == 2:
        hp = w.shape[0] // world
        w = w[rank * hp : (rank + 1) * hp]
    y = dispatch(OpInputs(theta, phi, g, inputs.mode, inputs.scale, w), backend)
    return gather_heads(y, group, n_sizes)


def allreduce(inputs: OpInputs, group, n_sizes: list[int], m_sizes: list[int], backend: str) -> Tensor:
    """Dot product: ``y = theta (Σ_r phi_r^T g_r) / M`` with one all-reduce of a (d, dv) matrix."""
    kv = all_reduce(torch.matmul(inputs.phi.transpose(-1, -2), inputs.g), group)
    return torch.matmul(inputs.theta, kv / sum(m_sizes))


def sorted_stats(inputs: OpInputs, group, n_sizes: list[int], m_sizes: list[int], backend: str) -> Tensor:
    """Concatenation: gather the compact key statistics (b_j, g_j) once, sort, prefix sums locally."""
    return concat_sorted(
        inputs.theta, inputs.phi, inputs.g, inputs.concat_weight,
        gather_keys=lambda b, g: gather_positions(group, m_sizes, b, g),
    )


STRATEGIES = {"ring": ring, "allgather": allgather, "ulysses": ulysses, "allreduce": allreduce, "sorted_stats": sorted_stats}
# Which strategies can run each mode; the first, the one with the lowest peak memory per rank, is
# the default (``default_strategy``).
MODE_STRATEGIES = {
    "gaussian": ("ring", "allgather", "ulysses"),
    "embedded_gaussian": ("ring", "allgather", "ulysses"),
    "dot_product": ("allreduce", "allgather", "ulysses"),
    "concatenation": ("sorted_stats", "allgather", "ulysses"),
}
# The backend whose formula a strategy computes across the group, where it runs no dispatch.
_OWN_FORMULA = {"allreduce": "linear", "sorted_stats": "sorted"}


# Softmax modes: where every rank's keys and values together take at most this many bytes, the
# default is the all-gather (one collective each way) instead of the ring, whose P - 1 steps are
# latency-bound there: a 2-rank I3D step on a tiny clip took 1.8x the all-gather's time by the ring
# (scripts/bench_video.py, README); the memory the ring saves is at most this much.
SMALL_KEYS_BYTES = 2**20


def default_strategy(mode: str, key_bytes: int | None = None) -> str:
    """The strategy for ``strategy=None``: the lowest peak memory per rank, on any number of ranks;
    for the softmax modes, the all-gather where the whole keys and values (``key_bytes``, when
    known) take at most ``SMALL_KEYS_BYTES``.

    Softmax modes: ``ring`` (O((N + M)/P · d) per rank, never the whole key set); dot product:
    ``allreduce`` (one (d, dv) matrix); concatenation: ``sorted_stats`` (two numbers per key). Ask
    for speed by naming ``allgather``: on 2 gloo ranks it took 0.72x of single-process SDPA's time
    against the ring's 0.85x, at a higher peak (24 vs 14.7 MiB per rank, N = 16384, d = 64:
    ``scripts/benchmark.py --suite parallel``, README); its peak grows with the whole key set.
    """
    first = MODE_STRATEGIES[mode][0]
    if first == "ring" and key_bytes is not None and key_bytes <= SMALL_KEYS_BYTES:
        return "allgather"
    return first


def check_backend(strategy: str, inputs: OpInputs, backend: str) -> None:
    """Raise ``ValueError`` naming the strategy, the backend and the reason where ``strategy`` cannot
    honour ``backend`` for this rank's ``inputs`` (every rank's declarations agree, so all raise)."""
    if strategy == "ring":
        select_block_kernel(inputs, backend, strategy)
    elif strategy in ("allgather", "ulysses"):
        select_backend(inputs, backend, strategy)
    elif backend not in ("auto", _OWN_FORMULA[strategy]):
        own = _OWN_FORMULA[strategy]
        raise ValueError(
            f"strategy {strategy!r} cannot run backend={backend!r}: it computes the {own!r} backend's formula "
            f"across the group (use backend='auto' or {own!r}; strategy='allgather' runs backend={backend!r} "
            "on the gathered keys)"
        )
