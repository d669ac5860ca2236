"""The differentiable position gathers (``distributed/collectives.py``) on gloo ranks, float64, uneven and
empty pieces: small parts of one shape travel packed in one all-gather and back in one all-to-all
(the CPU reduce-scatter, ``comm.reduce_scatter_parts``), large ones or parts of different shapes
one collective each way each; values and gradients equal either way."""
from __future__ import annotations

import pytest
import torch

from nonlocal_dist.testing import run_ranks

SIZES = {2: [3, 1], 3: [2, 0, 3]}


def _parts(world: int, widths: tuple[int, ...]) -> list[list[torch.Tensor]]:
    """Every rank's parts (B, H, L_r, c), the same on every rank (one generator)."""
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(1, 2, n, c, dtype=torch.float64, generator=g) for c in widths] for n in SIZES[world]]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _worker(rank, world, widths, pack_bytes):
    import torch.distributed as dist

    import nonlocal_dist.distributed.collectives as collectives
    import nonlocal_dist.distributed.comm as comm

    collectives.PACK_BYTES = pack_bytes
    calls = []
    start = comm._start
    comm._start = lambda collective, *a, **k: calls.append(collective.__name__) or start(collective, *a, **k)
    try:
        everyone = _parts(world, widths)
        mine = [p.clone().requires_grad_(True) for p in everyone[rank]]
        gathered = collectives.gather_positions(dist.group.WORLD, SIZES[world], *mine)
        forward = list(calls)
        g = torch.Generator().manual_seed(1 + rank)  # each rank's own loss weights
        weights = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in gathered]
        sum((t * w).sum() for t, w in zip(gathered, weights)).backward()
        backward = calls[len(forward):]
    finally:
        comm._start = start
    whole = [torch.cat([parts[i] for parts in everyone], dim=-2) for i in range(len(widths))]
    value_err = max(_err(a, b) for a, b in zip(gathered, whole))
    # Each rank's gradient: the sum over ranks of their weights' rows for this rank's positions.
    all_weights = []
    for r in range(world):
        g = torch.Generator().manual_seed(1 + r)
        all_weights.append([torch.randn(t.shape, dtype=torch.float64, generator=g) for t in whole])
    lo = sum(SIZES[world][:rank])
    expected = [sum(w[i] for w in all_weights)[..., lo : lo + SIZES[world][rank], :] for i in range(len(widths))]
    grad_err = max(_err(p.grad, e) for p, e in zip(mine, expected))
    return forward, backward, value_err, grad_err


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("widths, pack_bytes, gathers", [
    ((4, 4), 2**20, 1),  # keys and values alike and small: packed
    ((4, 4), 0, 2),  # over the size bound: one each
    ((4, 3), 2**20, 2),  # different shapes: one each
])
def test_small_parts_of_one_shape_travel_packed(world, widths, pack_bytes, gathers):
    for forward, backward, value_err, grad_err in run_ranks(_worker, world, widths, pack_bytes, timeout=120):
        assert len(forward) == gathers, forward
        assert backward == ["all_to_all_single"] * gathers, backward
        assert value_err == 0.0 and grad_err < 1e-12, (value_err, grad_err)


def _scatter_worker(rank, world, sizes, dim, mixed, padded):
    import torch.distributed as dist

    from nonlocal_dist.distributed import comm

    def reduce_scatter_parts(parts, sizes, dim, group):
        if padded:  # the path for NCCL tensors, on gloo here: parts of one shape in one reduce-scatter
            return comm._reduce_scatter_padded(parts, sizes, dim % parts[0].dim(), group)
        return comm.reduce_scatter_parts(parts, sizes, dim, group)

    def full(r: int, shape) -> torch.Tensor:
        return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * r + len(shape)))

    shapes = [[2, 3, sum(sizes), 4], [sum(sizes), 5] if not padded else [2, 3, sum(sizes), 4]]
    shapes[0][dim], shapes[0][2] = shapes[0][2], shapes[0][dim]
    if padded:
        shapes[1] = list(shapes[0])
    mine = [full(rank, s) for s in shapes]
    if not padded:  # a part whose slices are not adjacent in memory, of another dtype where mixed
        mine[1] = (mine[1].float() if mixed else mine[1]).t().contiguous().t()
    group = dist.group.WORLD
    got = reduce_scatter_parts(mine, sizes, dim, group) if dim == 0 or padded else [
        reduce_scatter_parts(mine[:1], sizes, dim, group)[0]]
    lo, n = sum(sizes[:rank]), sizes[rank]
    errs = []
    for t, mine_t, shape, d in zip(got, mine, shapes, (dim, dim if padded else 0)):
        assert t.dtype == mine_t.dtype, (t.dtype, mine_t.dtype)
        expected = sum(full(r, shape).to(t.dtype) for r in range(world)).narrow(d, lo, n)
        errs.append(_err(t, expected) / (1e-12 if t.dtype == torch.float64 else 1e-5))
    return max(errs)


@pytest.mark.parametrize("world, sizes", [(2, [3, 1]), (3, [2, 0, 3])])
@pytest.mark.parametrize("dim", [0, 2])
@pytest.mark.parametrize("mixed, padded", [(False, False), (True, False), (False, True)])
def test_reduce_scatter_sums_every_ranks_slice(world, sizes, dim, mixed, padded):
    """Uneven and empty slices, along the outer dim (two parts of different shapes in one
    collective, one laid out column-major; or of different dtypes, one collective each) and an inner
    one; and the padded reduce-scatter of NCCL tensors (two parts of one shape), run on gloo: each
    rank gets the sum of every rank's slice for its positions, in its part's dtype (errors below in
    units of 1e-12 for float64, 1e-5 for float32)."""
    assert max(run_ranks(_scatter_worker, world, sizes, dim, mixed, padded, timeout=120)) < 1


def _ulysses_worker(rank, world, pack_bytes):
    import torch.distributed as dist

    import nonlocal_dist.distributed.collectives as collectives
    import nonlocal_dist.distributed.comm as comm
    from nonlocal_dist.sequence.ulysses import ulysses_attention

    collectives.PACK_BYTES = pack_bytes
    calls = []
    start = comm._start
    comm._start = lambda collective, *a, **k: calls.append(collective.__name__) or start(collective, *a, **k)
    sizes = SIZES[world]
    g = torch.Generator().manual_seed(3)
    q, k, v, dy = (torch.randn(2, 2 * world, sum(sizes), c, dtype=torch.float64, generator=g) for c in (4, 4, 3, 3))
    lo, n = sum(sizes[:rank]), sizes[rank]
    mine = [t.narrow(2, lo, n).clone().requires_grad_(True) for t in (q, k, v)]
    try:
        y = ulysses_attention(*mine, 0.7, dist.group.WORLD, sizes, sizes, "blocked")
        forward = len(calls)
        y.backward(dy.narrow(2, lo, n))
        backward = len(calls) - forward
    finally:
        comm._start = start
    whole = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = torch.softmax(0.7 * whole[0] @ whole[1].transpose(-1, -2), -1) @ whole[2]
    ref.backward(dy)
    errs = [_err(y, ref.detach().narrow(2, lo, n))]
    errs += [_err(m.grad, w.grad.narrow(2, lo, n)) for m, w in zip(mine, whole)]
    return forward, backward, max(errs)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("pack_bytes, collectives_each_way", [(2**20, (2, 2)), (0, (4, 5))])
def test_ulysses_node_packs_small_parts(world, pack_bytes, collectives_each_way):
    """Ulysses' node (``sequence.ulysses``) on uneven and empty shards, heads split over the ranks:
    output and q, k, v gradients equal the materialised softmax attention's; q, k and v (and the
    backward's output and gradient, and dq, dk, dv) travel in one all-to-all where small, one each
    otherwise."""
    for forward, backward, err in run_ranks(_ulysses_worker, world, pack_bytes, timeout=120):
        assert (forward, backward) == collectives_each_way
        assert err < 1e-12, err
