"""Leak classes the op sweep found (``scripts/op_sweep.py``), each fixed at its root and checked here
on 2 gloo ranks against one process in float64: torch's argument aliases and overloads, a sharded
tensor in an argument other than the input, one group sharding two dims, ``full_tensor`` of a
vector with an empty piece."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nonlocal_dist.sharded import ShardingRefusal, distribute, full_tensor
from nonlocal_dist.testing import run_ranks


def _err(got, want) -> float:
    return (full_tensor(got) - want).abs().max().item() if want.numel() else 0.0


def _refused(fn) -> str:
    try:
        fn()
    except ShardingRefusal as exc:
        return "refused: " + str(exc).split(" at ")[0]
    return "ran"


def _aliases_and_overloads(x, xs) -> dict:
    """Numpy spellings (axis=, keepdims=, input=) and torch.var's overloads, reduced over the sharded dim 2."""
    calls = {
        "sum axis keepdims": lambda t: torch.sum(t, axis=2, keepdims=True),
        "mean input= axis": lambda t: torch.mean(input=t, axis=(1, 2)),
        "Tensor.amax axis": lambda t: t.amax(axis=2),
        "var(x, True)": lambda t: torch.var(t, True),
        "std(x, 2, False, True)": lambda t: torch.std(t, 2, False, True),
        "var(dim=, correction=0)": lambda t: torch.var(t, dim=2, correction=0),
        "Tensor.var(2, unbiased=False)": lambda t: t.var(2, unbiased=False),
    }
    return {name: _err(fn(xs), fn(x)) for name, fn in calls.items()}


def _operands(x, xs, rank) -> dict:
    """A sharded tensor where a rule reads only a plain one: refused, or run where only its shape is read."""
    w = torch.randn(5, dtype=torch.float64)
    ws = distribute(w, dist.group.WORLD, "c", "c", sizes=[[3, 2]])
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    means = distribute(mean, dist.group.WORLD, "c", "c", sizes=[[2, 1]])
    plain = torch.randn(2, 3, 5, dtype=torch.float64)
    return {
        "layer_norm sharded weight": _refused(lambda: F.layer_norm(plain, (5,), ws)),
        "batch_norm sharded running_mean": _refused(lambda: F.batch_norm(xs, means, var, training=True)),
        "group_norm sharded channels": _refused(lambda: F.group_norm(
            distribute(plain, dist.group.WORLD, "b c t", "c", sizes=[[2, 1]]), 1)),
        "adaptive pool keeping the sharded length": (full_tensor(F.adaptive_avg_pool1d(xs, 5)) - x).abs().max().item(),
        "view_as sharded target": (plain.reshape(6, 5).view_as(xs) - plain).abs().max().item(),
        "expand_as sharded target": (torch.ones(1, 1, 5, dtype=torch.float64).expand_as(xs) - 1).abs().max().item(),
    }


def _one_group_two_dims(rank) -> dict:
    """An outer sum of two vectors sharded over one group gathers one side; a layout with two dims over
    one group is refused at the entry point."""
    gen = torch.Generator().manual_seed(5)
    a, b, g = torch.randn(5, 1, generator=gen), torch.randn(4, generator=gen), torch.randn(5, 4, generator=gen)
    a, b, g = a.double(), b.double(), g.double()
    wa, wb = a.clone().requires_grad_(), b.clone().requires_grad_()
    ((wa + wb) * g).sum().backward()
    sa, sb = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = distribute(sa, dist.group.WORLD, "i j", "i", sizes=[[4, 1]]) + distribute(sb, dist.group.WORLD, "j", "j",
                                                                                   sizes=[[1, 3]])
    spec = [(d, list(s.sizes)) for d, s in out.spec.dims]
    (full_tensor(out) * g).sum().div(dist.get_world_size()).backward()
    grads = [sa.grad.clone(), sb.grad.clone()]
    for t in grads:
        dist.all_reduce(t)
    x = torch.randn(4, 6, dtype=torch.float64)
    group = dist.group.WORLD
    return {
        "outer sum": (spec, max((full_tensor(out) - (a + b)).abs().max().item(),
                                *((t - w.grad).abs().max().item() for t, w in zip(grads, (wa, wb))))),
        "two dims, one group": _refused(lambda: distribute(x, (group, group), "i j", ("i", "j"), sizes=[[2, 2], [3, 3]])),
    }


def _vector_with_an_empty_piece(rank) -> float:
    v = torch.arange(5, dtype=torch.float64)
    vs = distribute(v, dist.group.WORLD, "n", "n", sizes=[[5, 0]])
    return (full_tensor(vs.exp()) - v.exp()).abs().max().item()


def _empty_pieces(rank) -> dict:
    """3 ranks, the middle one empty: a kernel acting along other dims, and statistics over every sample."""
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen), torch.randn(2, 3, 6, dtype=torch.float64, generator=gen)
    want = x.clone().requires_grad_()
    (F.interpolate(want, size=6, mode="linear") * g).sum().backward()
    got = x.clone().requires_grad_()
    xs = distribute(got, dist.group.WORLD, "b c t", "c", sizes=[[2, 0, 1]])
    out = full_tensor(F.interpolate(xs, size=6, mode="linear"))
    (out * g).sum().div(dist.get_world_size()).backward()
    grad = got.grad.clone()
    dist.all_reduce(grad)
    interp = max((out - F.interpolate(x, size=6, mode="linear")).abs().max().item(), (grad - want.grad).abs().max().item())
    y = torch.randn(5, 2, 4, dtype=torch.float64, generator=gen)
    stats = [torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    mine = [s.clone() for s in stats]
    F.instance_norm(y, *stats, momentum=0.5)
    ys = distribute(y, dist.group.WORLD, "b c t", "b", sizes=[[3, 0, 2]])
    F.instance_norm(ys, *mine, momentum=0.5)
    wb = [torch.randn(2, dtype=torch.float64, generator=gen) for _ in range(2)]
    gy = torch.randn(5, 2, 4, dtype=torch.float64, generator=gen)
    ref_leaves = [t.clone().requires_grad_() for t in wb]
    want = torch.autograd.grad((F.batch_norm(y, None, None, *ref_leaves, training=True) * gy).sum(), ref_leaves)
    got_leaves = [t.clone().requires_grad_() for t in wb]
    out = full_tensor(F.batch_norm(ys, None, None, *got_leaves, training=True))
    got = torch.autograd.grad((out * gy).sum() / dist.get_world_size(), got_leaves)
    for t in got:  # in place, as a data-parallel reduction does: the two gradients must not share storage
        dist.all_reduce(t)
    return {"interpolate over channels": interp,
            "batch_norm weight and bias grads": max((a - b).abs().max().item() for a, b in zip(got, want)),
            "instance_norm running stats": max((a - b).abs().max().item() for a, b in zip(mine, stats))}


def _worker3(rank, world):
    return _empty_pieces(rank)


def test_empty_pieces_run_and_statistics_span_every_rank():
    for r in run_ranks(_worker3, 3, timeout=180):
        assert all(err < 1e-12 for err in r.values()), r


def _positions(x, xs) -> dict:
    """Ops whose result depends on each element's global position: refused over a sharded dim (each
    rank would count from its own piece), run on a replicated value."""
    pooled = xs.mean(2)  # replicated
    return {"where(condition)": _refused(lambda: torch.where(xs > 0)),
            "fill_diagonal_": _refused(lambda: xs[0].clone().fill_diagonal_(5.0)),
            "replicated where(condition)": [torch.equal(a.to_local(), b) for a, b in
                                            zip(torch.where(pooled > 0), torch.where(x.mean(2) > 0))],
            "replicated fill_diagonal_": torch.allclose(pooled.clone().fill_diagonal_(5.0).to_local(),
                                                        x.mean(2).fill_diagonal_(5.0), rtol=0, atol=1e-12)}


def _worker(rank, world):
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xs = distribute(x, dist.group.WORLD, "b c t", "t", sizes=[[3, 2]])
    return {"aliases": _aliases_and_overloads(x, xs), "operands": _operands(x, xs, rank),
            "two dims": _one_group_two_dims(rank), "vector": _vector_with_an_empty_piece(rank),
            "positions": _positions(x, xs)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2, timeout=180)


def test_aliases_and_overloads_are_read_as_torch_reads_them(results):
    for r in results:
        assert all(err < 1e-12 for err in r["aliases"].values()), r["aliases"]


def test_a_sharded_weight_or_statistic_is_refused_on_every_rank(results):
    for r in results:
        ops = r["operands"]
        assert ops["layer_norm sharded weight"].startswith("refused: F.layer_norm"), ops
        assert ops["batch_norm sharded running_mean"].startswith("refused: F.batch_norm"), ops
        assert ops["group_norm sharded channels"].startswith("refused: F.group_norm along sharded dim 1"), ops
        assert ops["adaptive pool keeping the sharded length"] < 1e-12, ops
        assert ops["view_as sharded target"] == 0.0 and ops["expand_as sharded target"] == 0.0, ops


def test_ops_on_global_positions_are_refused_over_a_sharded_dim(results):
    for r in results:
        ops = r["positions"]
        assert ops["where(condition)"].startswith("refused: torch.where"), ops
        assert ops["fill_diagonal_"].startswith("refused: Tensor.fill_diagonal_ along sharded dim 1"), ops
        assert ops["replicated where(condition)"] == [True, True] and ops["replicated fill_diagonal_"], ops


def test_one_group_never_shards_two_dims(results):
    for r in results:
        spec, err = r["two dims"]["outer sum"]
        assert spec == [(0, [4, 1])] and err < 1e-12, r["two dims"]
        assert r["two dims"]["two dims, one group"].startswith("refused: a result sharded on dims [0, 1]"), r


def test_full_tensor_of_a_vector_with_an_empty_piece(results):
    assert all(r["vector"] == 0.0 for r in results)


def _vmap_worker(rank, world):
    x = distribute(torch.arange(12.0).reshape(2, 6, 1), dist.group.WORLD, "b n c", ("n",))
    refusals = []
    transforms = (lambda f: torch.vmap(f), lambda f: torch.func.vmap(f, in_dims=1), torch.func.grad,
                  lambda f: lambda t: torch.func.vjp(f, t)[0], lambda f: torch.func.jacrev(f),
                  torch.func.functionalize,
                  lambda f: lambda t: torch.vmap(lambda y: y * t)(torch.ones(2, 2, 6, 1)))  # a shard captured
    for transform in transforms:
        try:
            transform(lambda t: (t * 2 + t.sum()).sum())(x)  # the sums would be over this rank's piece alone
        except ShardingRefusal as exc:
            refusals.append(str(exc))
    plain = torch.vmap(lambda t: t * 2 + t.sum())(torch.arange(6.0).reshape(2, 3))  # plain inputs: torch's vmap
    return refusals, plain.tolist()


def test_torch_func_transforms_over_a_sharded_activation_are_refused_on_every_rank():
    """vmap, grad, vjp, jacrev and functionalize unwrapped a ShardedTensor into its local shard in C++ (no
    __torch_function__ call), silently, and a vmapped function that captured one returned one rank's
    piece; now each is refused."""
    for refusals, plain in run_ranks(_vmap_worker, 2, timeout=120):
        assert len(refusals) == 7 and all("full_tensor" in r and "test_sharded_ops.py" in r for r in refusals), refusals
        assert plain == [[3.0, 5.0, 7.0], [18.0, 20.0, 22.0]]


def _inplace_dtype_worker(rank, world):
    x = distribute(torch.rand(2, 6, 3), dist.group.WORLD, "b n c", ("n",))
    try:
        x.cumsum_(1, dtype=torch.float64)  # torch refuses an in-place result of another dtype
    except RuntimeError as exc:
        return str(exc)
    return None


def test_an_in_place_scan_into_another_dtype_raises_as_torch_does():
    for message in run_ranks(_inplace_dtype_worker, 2, timeout=120):
        assert message is not None and "Bad in-place call" in message, message


def _autograd_grad_worker(rank, world):
    """torch.autograd.grad and torch.autograd.functional.vjp with respect to a sharded input (t split
    unevenly), the loss replicated and divided by the world (each rank's copy counts once in all, as
    parameters' gradients are summed over ranks): every gradient sharded as its input, whole values
    exact against one process; a second-order gradient through create_graph too."""
    x = torch.randn(1, 2, 7, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sizes = [5, 2] if world == 2 else [3, 0, 4]
    xs = distribute(x, dist.group.WORLD, "b c t h w", ("t",), sizes=[sizes]).requires_grad_()
    xr = x.clone().requires_grad_()

    def f(t):
        return (t.sin() * t).sum() / world if isinstance(t, type(xs)) else (t.sin() * t).sum()

    (want,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    (got,) = torch.autograd.grad(f(xs), xs, create_graph=True)
    (want2,) = torch.autograd.grad(want.square().sum(), xr)
    (got2,) = torch.autograd.grad(got.square().sum() / world, xs)
    _, vjp = torch.autograd.functional.vjp(f, xs)
    return {"types": [type(g).__name__ for g in (got, got2, vjp)], "shapes": [tuple(g.shape) for g in (got, got2, vjp)],
            "sum": abs(got.sum().item() - want.sum().item()),
            "errors": [_err(got, want), _err(got2, want2), _err(vjp, want)]}


@pytest.mark.parametrize("world", [2, 3])
def test_autograd_grad_of_a_sharded_input_is_sharded_and_exact(world):
    """autograd.grad returned each rank's local gradient as a plain tensor of the local shape (its sum
    was one rank's piece), unlike x.grad after backward(); now it is a ShardedTensor like x.grad."""
    for r in run_ranks(_autograd_grad_worker, world, timeout=120):
        assert r["types"] == ["ShardedTensor"] * 3 and r["shapes"] == [(1, 2, 7, 3, 3)] * 3, r
        assert r["sum"] < 1e-12 and max(r["errors"]) < 1e-12, r
