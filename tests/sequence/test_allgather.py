"""The all-gather's softmax node (``sequence.allgather``) on gloo ranks: it keeps only this rank's
keys and values for the backward (the gathered ones are gathered again there), and a graph of its
backward gives exact second derivatives, uneven and empty shards included, against one process."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class _Attention(nn.Module):
    """Self-attention over tokens (B, N, C) as a transformer block writes it, with a residual;
    ``checkpointed``: recomputed in the backward (torch.utils.checkpoint, non-reentrant)."""

    def __init__(self, channels: int = 8, heads: int = 2, checkpointed: bool = False) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels), heads
        self.checkpointed = checkpointed

    def forward(self, x):
        if self.checkpointed:
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)

    def block(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class _Logged:
    """A started gather whose wait is logged."""

    def __init__(self, started, calls: list) -> None:
        self.started, self.calls = started, calls

    def wait(self):
        self.calls.append("waited")
        return self.started.wait()


def _counted(fn, calls: list, name: str):
    def counting(*args, **kwargs):
        calls.append(name)
        got = fn(*args, **kwargs)
        return _Logged(got, calls) if name == "ahead" else got
    return counting


def _regathered_ahead(rank, world, checkpointed):
    """Three attention layers (each checkpointed or not, ``checkpointed``) parallelized over uneven token shards: which gathers each backward started
    ahead, waited for, or ran in line (a full backward, kept, then a partial one, one with a graph, and
    the full one again), and every gradient against one process (float64)."""
    import nonlocal_dist.sequence.allgather as allgather
    from nonlocal_dist import parallelize

    torch.manual_seed(0)
    whole = nn.Sequential(*(_Attention(checkpointed=c) for c in checkpointed)).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model = parallelize(copy.deepcopy(whole), dist.group.WORLD, "n", layout="b n c", strategy="allgather",
                        sizes=[SIZES[world][0]])
    calls: list = []
    plain = (allgather.gather_parts, allgather.start_gather_parts)
    allgather.gather_parts = _counted(plain[0], calls, "in line")
    allgather.start_gather_parts = _counted(plain[1], calls, "ahead")
    passes = {}

    def run(name, fn):
        before = len(calls)
        got = fn()
        passes[name] = calls[before:]
        return got

    try:
        xs = x.clone().requires_grad_()
        out = run("forward", lambda: model(xs))
        loss = (out * w).sum() / world  # every rank's loss on the whole output counts once per rank
        run("first", lambda: loss.backward(retain_graph=True))
        grads = [xs.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        # the last layer's weights only: the other layers' nodes do not run, so nothing starts for them
        run("partial", lambda: torch.autograd.grad(loss, model[2].qkv.weight, retain_graph=True))
        graph = run("graph", lambda: torch.autograd.grad(loss, xs, create_graph=True, retain_graph=True))[0]
        run("second", lambda: loss.backward())  # the graph kept: the same gathers again, the gradients twice
        twice = [xs.grad] + [p.grad for p in model.parameters()]
    finally:
        allgather.gather_parts, allgather.start_gather_parts = plain
    xr = x.clone().requires_grad_()
    (whole(xr) * w).sum().backward()
    want = [xr.grad] + [p.grad for p in whole.parameters()]
    # each rank's gradient is its part: their sum is one process's (parallelize's loss convention)
    summed = [g.clone() for g in grads]
    for g in summed:
        dist.all_reduce(g)
    return {**passes, "errors": [rel_err(a, b) for a, b in zip(summed, want)],
            "twice": [rel_err(b, 2 * a) for a, b in zip(grads, twice)], "graph error": rel_err(graph, grads[0])}


@pytest.mark.parametrize("world", [2, 3])
def test_backward_starts_each_gather_ahead_and_stays_exact(world):
    """Within a parallelized model's call, each attention's backward starts the gather of the one before
    it, which that one's backward waits for: only the last attention's is gathered in line, again on a
    second backward of the kept graph; a partial backward starts none for layers it does not reach, and
    a graph of the backward uses the differentiable gather. Uneven and empty shards included."""
    ahead = ["in line", "ahead", "waited", "ahead", "waited"]
    for rank, r in enumerate(run_ranks(_regathered_ahead, world, (False,) * 3, timeout=120)):
        assert r["forward"] == ["in line"] * 3, f"rank {rank}: {r['forward']}"
        assert r["first"] == r["second"] == ahead, f"rank {rank}: {r}"
        assert r["partial"] == ["in line"] and r["graph"] == [], f"rank {rank}: {r}"
        assert max(r["errors"]) <= 1e-12 and max(r["twice"]) <= 1e-15 and r["graph error"] <= 1e-15, f"rank {rank}: {r}"


@pytest.mark.parametrize("checkpointed, first", [
    ((True,) * 3, ["in line"] * 6),  # each recomputed forward gathers, then its backward
    ((False, True, False), ["in line"] * 4),  # the last, the middle one's recompute and backward, the first
])
def test_checkpointed_attention_gathers_in_line(checkpointed, first):
    """Under checkpointing, reading a node's saved keys early would recompute its block during the next
    block's backward: such nodes gather in line, and break the chain (the last layer does not start the
    first one's gather, which would travel, held, through the middle one's backward)."""
    for rank, r in enumerate(run_ranks(_regathered_ahead, 2, checkpointed, timeout=120)):
        assert r["first"] == r["second"] == first, f"rank {rank}: {r}"
        assert "ahead" not in r["partial"] + r["graph"], f"rank {rank}: {r}"
        assert max(r["errors"]) <= 1e-12 and max(r["twice"]) <= 1e-15 and r["graph error"] <= 1e-15, f"rank {rank}: {r}"
