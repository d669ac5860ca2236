"""Affinity rows of a ``NonLocalBlock`` for chosen query positions: the maps of the paper's Figure 1.

For a query position i the row is what multiplies ``g_j`` in ``y_i = 1/C(x) Σ_j f(x_i, x_j) g_j``:
``softmax_j(scale theta_i·phi_j)`` for the (embedded) gaussian, ``f(x_i, x_j) / M`` for dot product
and concatenation, over every key position j of the (sub-sampled) key grid. Only the Q rows are
computed, O(Q·M) values, never the (N, M) matrix. Under sequence parallelism each rank scores its
own key shard; see ``nonlocal_dist.parallel.affinity`` for the communication.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor

from nonlocal_dist.kernels.affinity import affinity_scores, normalise_scores
from nonlocal_dist.layout import flatten_positions, max_pool_positions
from nonlocal_dist.parallel.affinity import sharded_affinity_rows, share_query_rows
from nonlocal_dist.parallel.comm import all_gather_varlen
from nonlocal_dist.conventions import accumulation_dtype

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


def _exchange(block: NonLocalBlock, x: Tensor, **extra: int) -> tuple[dict[str, int], list[int] | None]:
    """The block's global grid {axis: size} and, under SP, every rank's shard length (one all-gather)."""
    sizes = block.layout.sizes(x)
    grid = {axis: sizes[axis] for axis in block.layout.axes}
    if block.sp_group is None:
        return grid, None
    lengths = block._check_shards(x, **extra)["shard_length"]
    grid[block.shard_axis] = sum(lengths)
    return grid, lengths


def query_grid(block: NonLocalBlock, x: Tensor) -> dict[str, int]:
    """Global sizes {axis: size} of the positions of ``block`` on input x (one all-gather under SP)."""
    block.layout.check(x, block.in_channels)
    return _exchange(block, x)[0]


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def _query_theta(block: NonLocalBlock, xp: Tensor, rows: tuple[Query, ...], offset: int) -> Tensor:
    """theta rows (B', H, Q, d) of the queries in this rank's slice of xp (B', *sizes, C); zero elsewhere."""
    k = block.layout.axes.index(block.shard_axis)
    length = xp.shape[1 + k]
    owned = [i for i, q in enumerate(rows) if offset <= q[k] < offset + length]
    flat = []
    for i in owned:
        position = 0
        for axis, (v, size) in enumerate(zip(rows[i], xp.shape[1:-1])):
            position = position * size + (v - offset if axis == k else v)
        flat.append(position)
    picked = flatten_positions(xp)[:, torch.tensor(flat, dtype=torch.long, device=xp.device)]  # (B', Q_owned, C)
    # Every rank calls the projection, owning queries or not: under ZeRO-3 it gathers the weights.
    theta = picked if block.theta is None else block.theta(picked)
    full = theta.new_zeros(theta.shape[0], len(rows), theta.shape[-1])
    full[:, owned] = theta
    return _split_heads(full, block.heads)


def _keys(block: NonLocalBlock, xp: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """phi (B', H, M_r, d) of this rank's (sub-sampled) key positions and their grid sizes."""
    phi = xp if block.phi is None else block.phi(xp)
    phi = max_pool_positions(phi, block.layout.axes, block.sub_sample)
    return _split_heads(flatten_positions(phi), block.heads), tuple(phi.shape[1:-1])


@torch.no_grad()
def affinity_rows(block: NonLocalBlock, x: Tensor, queries: Sequence[Sequence[int]] | Tensor) -> Tensor:
    """Normalised affinity rows (B', H, Q, *key grid) of ``block`` at the query positions.

    x: the block's input in its layout (with ``sp_group``: this rank's slice along ``shard_axis``).
    queries: Q positions, each a tuple of global indices over ``block.layout.axes`` (e.g. (t, h, w)).
    Row q: ``softmax_j(scale theta_q·phi_j)`` (gaussian, embedded gaussian) or ``f(theta_q, phi_j)/M``
    (dot product, concatenation) over the key grid (after ``sub_sample``); B' is b times the folded
    axes, H the heads. float32 (float64 for float64 input). Under SP every rank of the group calls
    it with the same queries and every rank gets the full rows, equal to the single-process ones.
    """
    block.layout.check(x, block.in_channels)
    error, rows = None, ()
    try:
        rows = _query_rows(queries, block.layout.axes)
    except (TypeError, ValueError) as exc:
        error = exc
    if block.sp_group is None:
        if error is not None:
            raise error
        grid, lengths = _exchange(block, x)
    else:
        grid, lengths = _exchange_checked(block, x, rows, error)
    _check_range(rows, grid, lengths is not None)
    rank = 0 if lengths is None else dist.get_rank(block.sp_group)
    xp = block.layout.to_positions(x)
    acc = accumulation_dtype(x.dtype)
    theta = _query_theta(block, xp, rows, sum(lengths[:rank]) if lengths else 0).to(acc)
    phi, key_grid = _keys(block, xp)
    phi = phi.to(acc)
    w = None if block.concat_weight is None else block.concat_weight.to(acc)
    if lengths is None:
        f = normalise_scores(affinity_scores(theta, phi, block.mode, block.scale, w), block.mode, phi.shape[-2])
        return f.unflatten(-1, key_grid)
    k = block.layout.axes.index(block.shard_axis)
    pooled = [length // block.sub_sample.get(block.shard_axis, 1) for length in lengths]
    others = phi.shape[-2] // key_grid[k]
    theta = share_query_rows(theta, block.sp_group)
    f = sharded_affinity_rows(theta, phi, block.mode, block.scale, w, block.sp_group, [p * others for p in pooled])
    return all_gather_varlen(f.unflatten(-1, key_grid), pooled, dim=3 + k, group=block.sp_group)


def _exchange_checked(block: NonLocalBlock, x: Tensor, rows: tuple[Query, ...], error: Exception | None):
    # A rank with malformed queries still joins the metadata all-gather, so every rank raises.
    try:
        result = _exchange(block, x, query_error=int(error is not None), queries=hash(rows) if error is None else 0)
    except ValueError:
        if error is not None:
            raise error from None
        raise
    if error is not None:
        raise error
    return result


__all__ = ["affinity_rows", "query_grid"]
