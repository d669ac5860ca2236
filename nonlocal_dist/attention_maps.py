"""Affinity rows of a ``NonLocalBlock`` for chosen query positions: the maps of the paper's Figure 1.

For a query position i the row is what multiplies ``g_j`` in ``y_i = 1/C(x) Σ_j f(x_i, x_j) g_j``:
``softmax_j(scale theta_i·phi_j)`` for the (embedded) gaussian, ``f(x_i, x_j) / M`` for dot product
and concatenation, over every key position j of the (sub-sampled) key grid. Only the Q rows are
computed, O(Q·M) values, never the (N, M) matrix. Under sequence parallelism each rank scores its
own key shard; see ``nonlocal_dist.sequence.affinity`` for the communication.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.conventions import accumulation_dtype
from nonlocal_dist.distributed.checks import agree_on_shards
from nonlocal_dist.distributed.comm import all_gather_varlen
from nonlocal_dist.kernels.affinity import affinity_scores, normalise_scores
from nonlocal_dist.sequence.affinity import sharded_affinity_rows, share_query_rows
from nonlocal_dist.sharded.tensor import ShardedTensor, ShardingRefusal

if TYPE_CHECKING:
    from nonlocal_dist.block import NonLocalBlock

Query = tuple[int, ...]


def _query_rows(queries: object, axes: tuple[str, ...]) -> tuple[Query, ...]:
    """``queries`` as a tuple of index tuples over ``axes``; TypeError/ValueError naming the bad entry."""
    example = tuple(range(len(axes)))
    hint = f"a sequence of ({', '.join(axes)}) index tuples, e.g. [{example}]"
    if isinstance(queries, Tensor):
        queries = queries.tolist()
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise TypeError(f"queries must be {hint}; got {type(queries).__name__}")
    if not queries:
        raise ValueError(f"queries is empty; pass at least one query position: {hint}")
    rows = []
    for i, query in enumerate(queries):
        if isinstance(query, Tensor):
            query = query.tolist()
        if isinstance(query, (str, bytes)) or not isinstance(query, Sequence) or len(query) != len(axes):
            raise ValueError(f"queries[{i}] = {query!r}: expected {len(axes)} indices, one per axis ({', '.join(axes)})")
        try:
            if any(isinstance(v, bool) for v in query):
                raise TypeError
            rows.append(tuple(operator.index(v) for v in query))
        except TypeError:
            raise TypeError(f"queries[{i}] = {query!r}: indices must be ints") from None
    return tuple(rows)


def _check_range(rows: tuple[Query, ...], grid: dict[str, int], sharded: bool) -> None:
    for i, query in enumerate(rows):
        for (axis, size), v in zip(grid.items(), query):
            if not 0 <= v < size:
                where = " (global, over every rank of the group)" if sharded else ""
                raise ValueError(
                    f"queries[{i}] = {query}: index {v} on axis {axis!r} is outside 0..{size - 1}; the query grid "
                    f"is {grid}{where}. Give non-negative indices within it."
                )


def _agreed_grid(block: NonLocalBlock, x: Tensor, what: str, extra=None, extra_names: tuple[str, ...] = ()):
    """(extra's result, global grid {axis: size}, every rank's shard length or None), checked on every rank.

    ``extra()``: more local checks returning ``(result, fields)``; under SP a failure on one rank, or
    ranks disagreeing on the fields, raise on every rank (``distributed.checks.agree_on_shards``).
    """
    if block.sp_group is None:
        block.layout.check(x, block.in_channels)
        result, lengths = (extra()[0] if extra is not None else None), None
    else:
        result, lengths = agree_on_shards(block.sp_group, x, block.layout, block.in_channels, block.shard_axis,
                                          block.sub_sample, what=what, extra=extra, extra_names=extra_names)
    sizes = block.layout.sizes(x)
    grid = {a: sum(lengths) if lengths is not None and a == block.shard_axis else sizes[a] for a in block.layout.axes}
    return result, grid, lengths


def query_grid(block: NonLocalBlock, x: Tensor) -> dict[str, int]:
    """Global sizes {axis: size} of the positions of ``block`` on input x (one all-gather under SP)."""
    return _agreed_grid(block, x, "query_grid")[1]


def _checked_queries(block: NonLocalBlock, x: Tensor, queries: object) -> tuple[tuple[Query, ...], dict[str, int], list[int] | None]:
    """Parsed queries, global grid and shard lengths; under SP every rank raises when one rank's input is bad."""
    def extra():
        rows = _query_rows(queries, block.layout.axes)
        return rows, {"queries": rows, "mode": block.mode, "concat_weight": block.concat_weight}

    rows, grid, lengths = _agreed_grid(block, x, "affinity_rows", extra, ("queries", "mode", "concat_weight"))
    _check_range(rows, grid, lengths is not None)  # same rows and grid on every rank: all raise alike
    return rows, grid, lengths


def _query_theta(theta: Tensor, rows: tuple[Query, ...], sizes: tuple[int, ...], k: int, offset: int) -> Tensor:
    """theta rows (B', H, Q, d) of the queries in this rank's positions (sizes, shard axis k from offset); zero elsewhere."""
    owned = [i for i, q in enumerate(rows) if offset <= q[k] < offset + sizes[k]]
    flat = []
    for i in owned:
        position = 0
        for axis, (v, size) in enumerate(zip(rows[i], sizes)):
            position = position * size + (v - offset if axis == k else v)
        flat.append(position)
    full = theta.new_zeros(*theta.shape[:2], len(rows), theta.shape[-1])
    full[:, :, owned] = theta[:, :, torch.tensor(flat, dtype=torch.long, device=theta.device)]
    return full


@torch.no_grad()
def affinity_rows(block: NonLocalBlock, x: Tensor, queries: Sequence[Sequence[int]] | Tensor) -> Tensor:
    """Normalised affinity rows (B', H, Q, *key grid) of ``block`` at the query positions.

    x: the block's input in its layout (with ``sp_group``: this rank's slice along ``shard_axis``).
    queries: Q positions, each a tuple of global indices over ``block.layout.axes`` (e.g. (t, h, w)).
    Row q: ``softmax_j(scale theta_q·phi_j)`` (gaussian, embedded gaussian) or ``f(theta_q, phi_j)/M``
    (dot product, concatenation) over the key grid (after ``sub_sample``); B' is b times the folded
    axes, H the heads. float32 (float64 for float64 input). Under SP every rank of the group calls
    it with the same queries and every rank gets the full rows, equal to the single-process ones; a
    bad input or queries on one rank raise on every rank.
    """
    if isinstance(x, ShardedTensor) and len(x.spec.dims) > 1:
        raise ShardingRefusal(
            f"affinity_rows on an activation sharded on {len(x.spec.dims)} dims (a 2-D mesh): the maps take one "
            "sharded axis; gather the activation along the others first (full_tensor) or map a 1-D-sharded run"
        )
    with block.on_shards(x) as local:  # a ShardedTensor: its shard, the block's group from its spec
        return _affinity_rows(block, local, queries)


def _affinity_rows(block: NonLocalBlock, x: Tensor, queries: Sequence[Sequence[int]] | Tensor) -> Tensor:
    rows, grid, lengths = _checked_queries(block, x, queries)
    axes = block.layout.axes
    xp = block.layout.to_positions(x)
    sizes = tuple(xp.shape[1:-1])
    key_grid = tuple(size // block.sub_sample.get(axis, 1) for axis, size in zip(axes, sizes))
    theta, phi, _ = block.embed(xp)  # the block's own projections (theta for every position: O(N d))
    acc = accumulation_dtype(x.dtype)
    k = axes.index(block.shard_axis) if lengths is not None else 0
    offset = sum(lengths[: dist.get_rank(block.sp_group)]) if lengths is not None else 0
    theta = _query_theta(theta, rows, sizes, k, offset).to(acc)
    phi = phi.to(acc)
    w = None if block.concat_weight is None else block.concat_weight.to(acc)
    if lengths is None:
        f = normalise_scores(affinity_scores(theta, phi, block.mode, block.scale, w), block.mode, phi.shape[-2])
        return f.unflatten(-1, key_grid)
    pooled = [length // block.sub_sample.get(block.shard_axis, 1) for length in lengths]
    others = math.prod(size for i, size in enumerate(key_grid) if i != k)  # keys per shard-axis position
    theta = share_query_rows(theta, block.sp_group)
    f = sharded_affinity_rows(theta, phi, block.mode, block.scale, w, block.sp_group, [p * others for p in pooled])
    return all_gather_varlen(f.unflatten(-1, key_grid), pooled, dim=3 + k, group=block.sp_group)


__all__ = ["affinity_rows", "query_grid"]
