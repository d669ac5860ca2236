"""Transposed convolutions (F.conv_transpose1d/2d/3d, torch.conv_transpose*, nn.ConvTranspose3d) on
activations sharded along t, on 3 real gloo ranks: each rank's output equals its slice of the
single-process result (the slice read off the output's spec), and the input, weight and bias
gradients summed over ranks equal the single-process ones, for uneven and empty shards, strides
1/2/3, dilation, groups, padding, output_padding, kernels smaller and larger than the stride and
overlaps spanning several ranks; ``halo_reduce`` is the adjoint of ``halo_exchange``; refusals and
invalid arguments raise on every rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import shaped_err
from torch import nn

from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.sharded.distribute import distribute
from nonlocal_dist.sharded.halo import halo_exchange, halo_reduce
from nonlocal_dist.sharded.tensor import ShardedTensor
from nonlocal_dist.testing import run_ranks

TOL = 1e-12
LAYOUTS = {3: "b c t", 4: "b c t w", 5: "b c t h w"}
# Shard lengths over 3 ranks along t (T = 5): uneven with an empty last rank, an empty first rank, short shards.
SIZES = ([4, 1, 0], [0, 2, 3], [1, 1, 3])
CONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (spatial dims, C_in, C_out, kernel, keyword arguments); the t axis is the first spatial dim.
CASES = [
    (1, 2, 3, 3, dict(stride=1, padding=1)),
    (1, 2, 3, 3, dict(stride=2, padding=1, output_padding=1)),
    (1, 2, 3, 4, dict(stride=2, padding=1)),
    (1, 2, 3, 2, dict(stride=2)),
    (1, 2, 3, 1, dict(stride=3)),  # kernel smaller than the stride: gaps between the inputs' outputs
    (1, 2, 3, 2, dict(stride=3, output_padding=2)),  # the output_padding positions get the bias only
    (1, 2, 2, 5, dict(stride=3, dilation=2, padding=2, output_padding=2)),
    (1, 2, 3, 3, dict(stride=1, dilation=3, output_padding=2)),  # output_padding < dilation
    (1, 4, 2, 3, dict(stride=2, padding=2, groups=2)),
    (1, 2, 3, 7, dict(stride=1, dilation=2, padding=1)),  # overlap of 12 > every shard: several ranks
    (1, 2, 3, 6, dict(stride=3, padding=7)),  # padding larger than the overlap: whole shards cropped
    (1, 2, 3, 3, dict(stride=2, padding=1, bias=False)),
    (2, 2, 3, (3, 2), dict(stride=(2, 1), padding=(1, 1), output_padding=(1, 0))),
    (3, 2, 4, (3, 3, 2), dict(stride=(2, 1, 2), padding=(1, 1, 0), output_padding=(1, 0, 1), groups=2)),
]


def _compare(name: str, fn, x: torch.Tensor, params: list[torch.Tensor], sizes: list[int], gen) -> list[str]:
    """``fn(x)`` whole and sharded; the problems found (output, input and parameter gradients)."""
    xw = x.clone().requires_grad_()
    for p in params:
        p.grad = None
    yw = fn(xw)
    w = torch.randn(yw.shape, generator=gen, dtype=torch.float64)
    (yw * w).sum().backward()
    want = [xw.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    xr = x.clone().requires_grad_()
    xs = distribute(xr, dist.group.WORLD, LAYOUTS[x.dim()], "t", sizes=[sizes])
    ys = fn(xs)
    if not isinstance(ys, ShardedTensor):
        return [f"{name} {sizes}: result is a {type(ys).__name__}"]
    shard = ys.spec.sharded[2]
    if tuple(ys.shape) != tuple(yw.shape) or shard.total != yw.shape[2]:
        return [f"{name} {sizes}: global shape {tuple(ys.shape)} vs {tuple(yw.shape)}"]
    local = ys.to_local()
    problems = []
    err = shaped_err(local.detach(), yw.detach().narrow(2, shard.start, shard.local))
    if err > TOL:
        problems.append(f"{name} {sizes}: output error {err:.2e} (output shards {shard.sizes})")
    (local * w.narrow(2, shard.start, shard.local)).sum().backward()
    got = [xr.grad] + [p.grad for p in params]
    for what, g, ref in zip(["input"] + [f"param{i}" for i in range(len(params))], got, want):
        g = torch.zeros_like(ref) if g is None else g.clone()
        dist.all_reduce(g)
        err = shaped_err(g, ref)
        if err > TOL:
            problems.append(f"{name} {sizes}: {what} gradient error {err:.2e}")
    return problems


def _cases(rank, world):
    problems = []
    for index, (n, c_in, c_out, kernel, kwargs) in enumerate(CASES):
        name = f"case {index} k={kernel} {kwargs}"
        kwargs = dict(kwargs)
        gen = torch.Generator().manual_seed(index)
        groups = kwargs.get("groups", 1)
        ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
        weight = torch.randn(c_in, c_out // groups, *ks, generator=gen, dtype=torch.float64).requires_grad_()
        params = [weight]
        if kwargs.pop("bias", True):
            kwargs["bias"] = torch.randn(c_out, generator=gen, dtype=torch.float64).requires_grad_()
            params.append(kwargs["bias"])
        x = torch.randn(2, c_in, 5, *(4, 3)[: n - 1], generator=gen, dtype=torch.float64)
        conv = CONV[n] if index % 2 == 0 else getattr(torch, CONV[n].__name__)

        def fn(t, conv=conv, weight=weight, kwargs=kwargs):
            return conv(t, weight, **kwargs)

        for sizes in SIZES:
            problems += _compare(f"{name} {conv.__name__}", fn, x, params, sizes, gen)

    # nn.ConvTranspose3d (kernel 2, stride 2: no overlap, no communication), then one with an overlap
    # and output_size, then an in-place activation on the result.
    torch.manual_seed(0)
    for module in (
        nn.ConvTranspose3d(3, 2, kernel_size=2, stride=2).double(),
        nn.ConvTranspose3d(3, 2, kernel_size=3, stride=(2, 1, 1), padding=1, bias=False).double(),
    ):
        gen = torch.Generator().manual_seed(100)
        x = torch.randn(1, 3, 5, 3, 2, generator=gen, dtype=torch.float64)
        params = list(module.parameters())
        for sizes in SIZES:
            problems += _compare(f"{module}", lambda t: F.relu_(module(t)), x, params, sizes, gen)
            if module.stride[0] == 2 and module.padding[0] == 1:
                problems += _compare(f"{module} output_size", lambda t: module(t, output_size=(10, 3, 2)),
                                     x, params, sizes, gen)
    return problems


def test_conv_transpose_matches_single_process():
    problems = run_ranks(_cases, 3, timeout=120)
    assert not any(problems), problems


def _adjoint(rank, world):
    """<halo_exchange(x), y> == <x, halo_reduce(y)> summed over ranks, and halo_reduce's backward."""
    results = []
    for sizes, before, after, fill in (([4, 1, 0], 2, 3, (1, 2)), ([0, 2, 3], 4, 1, (0, 0)), ([1, 1, 3], 0, 2, (2, 0))):
        gen = torch.Generator().manual_seed(sum(sizes) + before)
        x = torch.randn(2, sum(sizes), 3, generator=gen, dtype=torch.float64).split(sizes, 1)[rank].contiguous()
        ext = halo_exchange(x, 1, before, after, sizes, dist.group.WORLD, fill)
        y = torch.randn(2, ext.shape[1], 3, generator=gen, dtype=torch.float64).requires_grad_()
        red = halo_reduce(y, 1, before, after, sizes, dist.group.WORLD, fill)
        lhs, rhs = (ext * y).sum().reshape(1), (x * red).sum().reshape(1)
        dist.all_reduce(lhs)
        dist.all_reduce(rhs)
        (red * x).sum().backward()  # d<x, reduce(y)>/dy = exchange(x), zero at the fill
        results.append((abs(lhs - rhs).item(), (y.grad - ext.detach()).abs().max().item() if y.numel() else 0.0,
                        tuple(red.shape)))
    return results


def test_halo_reduce_is_the_adjoint_of_halo_exchange():
    for rank, results in enumerate(run_ranks(_adjoint, 3, timeout=60)):
        for lhs_rhs, grad, shape in results:
            assert lhs_rhs < 1e-12 and grad == 0.0, (rank, results)


def _refusals(rank, world):
    x = torch.randn(1, 4, 5, 3, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    out = []
    xs = distribute(x, dist.group.WORLD, "b c t w", "c", sizes=[[2, 2, 0]])
    try:
        F.conv_transpose2d(xs, w)
        out.append("channel: no error")
    except ShardingRefusal as exc:
        out.append("channel: " + str(exc).split(" at ")[0])
    xs = distribute(x, dist.group.WORLD, "b c t w", "t", sizes=[[4, 1, 0]])
    try:
        F.conv_transpose2d(xs, w, stride=2, output_padding=(2, 0))
        out.append("output_padding: no error")
    except RuntimeError as exc:
        out.append("output_padding: " + type(exc).__name__)
    try:
        F.conv_transpose2d(xs, w, padding=(4, 0))
        out.append("too small: no error")
    except RuntimeError as exc:
        out.append("too small: " + type(exc).__name__)
    return out


def test_refusals_on_every_rank():
    results = run_ranks(_refusals, 3, timeout=60)
    assert all(r == results[0] for r in results), results
    assert results[0][0].startswith("channel: torch.conv_transpose2d along sharded dim 1"), results[0]
    assert results[0][1:] == ["output_padding: RuntimeError", "too small: RuntimeError"], results[0]
