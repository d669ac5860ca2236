"""Attention over a sharded sequence keeps the model's memory layout (2 and 3 gloo ranks, uneven and
empty shards, float64): q, k and v given positions-first, as a model's ``(b n (h d)) -> (b n h d)
-> (b h n d)`` view leaves them, give the float64 oracle's output and gradients; the output comes back
positions-first, so the model's transpose and flatten after it are views; and the tensor the
attention saves for its backward is that output itself, not a second copy of it."""
from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from oracle import naive_nonlocal

from nonlocal_dist.kernels.softmax import in_layout_of, positions_first
from nonlocal_dist.testing import run_ranks

SIZES = {2: [5, 3], 3: [4, 0, 3]}
CASES = [("ring", "auto"), ("ring", "blocked"), ("ulysses", "auto"), ("ulysses", "blocked"), ("allgather", "auto")]


def _positions_first(*shape: int, generator) -> torch.Tensor:
    b, h, n, d = shape
    return torch.randn(b, n, h, d, dtype=torch.float64, generator=generator).transpose(1, 2)


def _worker(rank, world, strategy, backend, dv, fused=False):
    import torch.distributed as dist

    import nonlocal_dist.kernels.softmax as softmax
    from nonlocal_dist.sequence.api import parallel_nonlocal

    sizes = SIZES[world]
    g = torch.Generator().manual_seed(5)
    q, k, v, dy = (_positions_first(2, 2 * world, sum(sizes), c, generator=g) for c in (8, 8, dv, dv))
    lo, n = sum(sizes[:rank]), sizes[rank]
    # this rank's shards, each stored positions-first on its own, as a model's are
    leaves = [t.narrow(2, lo, n).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v)]
    if fused:  # one (b n (3 h d)) projection's output split into q, k and v (positions 3·h·d apart)
        qkv = torch.stack([t.detach().transpose(1, 2) for t in leaves], 2).requires_grad_(True)
        leaves = [t.transpose(1, 2) for t in qkv.unbind(2)]
    saved = []
    chunk, softmax.CPU_BACKWARD_CHUNK = softmax.CPU_BACKWARD_CHUNK, 2  # the ring's backward in strided query chunks
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            y = parallel_nonlocal(*leaves, "embedded_gaussian", scale=0.4, concat_weight=None, backend=backend,
                                  group=dist.group.WORLD, strategy=strategy, lengths=(sizes, sizes))
        y.backward(dy.narrow(2, lo, n))
    finally:
        softmax.CPU_BACKWARD_CHUNK = chunk
    layout = n < 2 or (y.transpose(1, 2).is_contiguous() and y.untyped_storage().data_ptr() in saved)
    q_kept = n == 0 or leaves[0].untyped_storage().data_ptr() in saved
    grads = [t.grad for t in leaves] if not fused else [g.transpose(1, 2) for g in qkv.grad.unbind(2)]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = naive_nonlocal(*ref_leaves, "embedded_gaussian", scale=0.4)
    ref.backward(dy)
    errs = [rel_err(y, ref.detach().narrow(2, lo, n))] if n else []
    errs += [rel_err(m, r.grad.narrow(2, lo, n)) for m, r in zip(grads, ref_leaves) if n]
    return layout, q_kept, max(errs, default=0.0)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy, backend, dv", [*((s, b, 8) for s, b in CASES), ("ring", "auto", 12),
                                                   ("ulysses", "auto", 12)])
def test_positions_first_inputs_give_a_positions_first_output_saved_once(world, strategy, backend, dv):
    """Every softmax strategy (the ring and Ulysses with the fused and the blocked kernel, the
    all-gather with torch's public call; the ring's backward in query chunks of 2): exact, and the
    output positions-first and the one saved; q saved as the model gave it, not a copy, where the
    strategy keeps it in place and no padding is needed (d = dv: the ring, the all-gather). With
    dv != d (the fused kernels pad to one head size) the output is still laid out positions-first."""
    for layout, q_kept, err in run_ranks(_worker, world, strategy, backend, dv, timeout=120):
        assert err < 1e-10, err
        assert layout, "the output is not positions-first, or the attention saved a copy of it"
        if strategy != "ulysses" and dv == 8:
            assert q_kept, "q was copied before the kernel"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy, backend", CASES)
def test_fused_qkv_inputs_give_a_positions_first_output_saved_once(world, strategy, backend):
    """q, k and v as slices of one fused projection: the output still positions-first and the one saved."""
    for layout, q_kept, err in run_ranks(_worker, world, strategy, backend, 8, True, timeout=120):
        assert err < 1e-10, err
        assert layout, "the output is not positions-first, or the attention saved a copy of it"
        if strategy != "ulysses":
            assert q_kept, "q was copied before the kernel"


def test_in_layout_of_copies_only_when_needed():
    x = torch.randn(2, 7, 3, 4).transpose(1, 2)  # (B, H, N, d), positions-first
    head_major = x.contiguous()
    assert positions_first(x) and not positions_first(head_major)
    moved = in_layout_of(head_major, x)
    assert positions_first(moved) and torch.equal(moved, head_major)
    assert in_layout_of(x, x) is x and in_layout_of(head_major, head_major) is head_major
    fused = torch.randn(2, 7, 3, 3, 4).unbind(2)[0].transpose(1, 2)  # q of a fused (b n (3 h d)) projection
    assert positions_first(fused) and not fused.transpose(1, 2).is_contiguous()
    moved = in_layout_of(head_major, fused)
    assert positions_first(moved) and torch.equal(moved, head_major)
    assert moved.transpose(1, 2).flatten(2).data_ptr() == moved.data_ptr()  # the model's flatten: a view
