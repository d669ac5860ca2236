"""The all-gather's softmax node (``sequence.allgather``) on gloo ranks: it keeps only this rank's
keys and values for the backward (the gathered ones are gathered again there), and a graph of its
backward gives exact second derivatives, uneven and empty shards included, against one process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import rel_err

from nonlocal_dist import nonlocal_op
from nonlocal_dist.testing import run_ranks

SIZES = {2: ([4, 3], [2, 5]), 3: ([3, 0, 4], [2, 4, 1])}  # query and key positions per rank: uneven, one empty


def _data():
    gen = torch.Generator().manual_seed(3)
    n, m = 7, 7
    q = torch.randn(2, 2, n, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, m, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, m, 3, generator=gen, dtype=torch.float64)
    return q, k, v


def _saved_and_second_order(rank, world):
    n_sizes, m_sizes = SIZES[world]
    q, k, v = _data()
    mine = [t.split(s, dim=2)[rank].clone().requires_grad_() for t, s in ((q, n_sizes), (k, m_sizes), (v, m_sizes))]
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = nonlocal_op(*mine, "embedded_gaussian", scale=0.5, group=dist.group.WORLD, strategy="allgather")
    # Second order: d/d(q, k, v) of |dq|^2 + |dk|^2, where dq, dk come from a graph of the backward
    # (a loss every rank holds counts once per rank: divided by the world for one process's gradients).
    first = torch.autograd.grad(y.square().sum(), mine[:2], create_graph=True)
    total = sum(g.square().sum() for g in first)
    second = torch.autograd.grad(total, mine, allow_unused=True)

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    y_ref = nonlocal_op(*whole, "embedded_gaussian", scale=0.5)
    first_ref = torch.autograd.grad(y_ref.square().sum(), whole[:2], create_graph=True)
    second_ref = torch.autograd.grad(sum(g.square().sum() for g in first_ref), whole)
    errors = {}
    for name, got, want, sizes in zip(("y", "dq", "dk"), (y, *first), (y_ref, *first_ref), (n_sizes, n_sizes, m_sizes)):
        errors[name] = rel_err(got, want.split(sizes, dim=2)[rank]) if sizes[rank] else 0.0
    for name, got, want, sizes in zip(("d2q", "d2k", "d2v"), second, second_ref, (n_sizes, m_sizes, m_sizes)):
        errors[name] = "missing" if got is None else rel_err(got, want.split(sizes, dim=2)[rank]) if sizes[rank] else 0.0
    return {"gathered saved": [s for s in shapes if s[-2] == sum(m_sizes)], "errors": errors}


@pytest.mark.parametrize("world", [2, 3])
def test_allgather_keeps_local_keys_and_second_order_is_exact(world):
    """The node saved the gathered keys and values before (every rank held all of them until the
    backward); a graph of its backward must still be exact, as the all-gather of plain ops was."""
    for rank, r in enumerate(run_ranks(_saved_and_second_order, world, timeout=120)):
        assert r["gathered saved"] == [], f"rank {rank} saved the gathered keys: {r['gathered saved']}"
        bad = {k: e for k, e in r["errors"].items() if not (isinstance(e, float) and e <= 1e-12)}
        assert not bad, f"rank {rank}: {bad}"


def _graph_through(rank, world, strategy):
    q, k, v = _data()
    mine = [t.tensor_split(world, dim=2)[rank].clone().requires_grad_() for t in (q, k, v)]
    y = nonlocal_op(*mine, "embedded_gaussian", scale=0.5, group=dist.group.WORLD, strategy=strategy)
    try:
        torch.autograd.grad(y.square().sum(), mine[0], create_graph=True)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_ring_and_ulysses_refuse_a_graph_of_the_backward_on_every_rank(strategy):
    """Their fused kernels' backward has no derivative: before, torch's own errors ('a view was created
    in no_grad mode', 'element 0 of tensors does not require grad') named nothing to do."""
    for message in run_ranks(_graph_through, 2, strategy, timeout=120):
        assert "cannot make a graph of its backward" in message and "strategy='allgather'" in message, message


def _second_order_dispatched(rank, world, mode):
    """The all-gather of the modes that dispatch on the gathered keys (dot product, concatenation):
    a graph of the backward through the gather and its reduce-scatter, a rank without queries."""
    n_sizes, m_sizes = SIZES[world]
    q, k, v = _data()
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) if mode == "concatenation" else None
    mine = [t.split(s, dim=2)[rank].clone().requires_grad_() for t, s in ((q, n_sizes), (k, m_sizes), (v, m_sizes))]
    y = nonlocal_op(*mine, mode, concat_weight=w, group=dist.group.WORLD, strategy="allgather")
    first = torch.autograd.grad(y.square().sum(), mine[:2], create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), mine)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    y_ref = nonlocal_op(*whole, mode, concat_weight=w)
    first_ref = torch.autograd.grad(y_ref.square().sum(), whole[:2], create_graph=True)
    second_ref = torch.autograd.grad(sum(g.square().sum() for g in first_ref), whole)
    return {name: rel_err(got, want.split(sizes, dim=2)[rank]) if sizes[rank] else 0.0
            for name, got, want, sizes in zip(("d2q", "d2k", "d2v"), second, second_ref, (n_sizes, m_sizes, m_sizes))}


@pytest.mark.parametrize("mode", ["dot_product", "concatenation"])
def test_allgather_of_the_dispatched_modes_gives_exact_second_derivatives(mode):
    """A rank without queries raised alone ('element 0 of tensors does not require grad') while the
    others waited: its zeros were outside the graph, so it skipped the second pass's collectives."""
    for rank, errors in enumerate(run_ranks(_second_order_dispatched, 3, mode, timeout=120)):
        assert max(errors.values()) <= 1e-12, f"rank {rank}: {errors}"
