"""F.pad (every mode) and F.interpolate on activations sharded along t, on real gloo ranks: each rank's
output equals its slice of the single-process result (the slice read off the output's spec), and the
input gradient summed over ranks equals the single-process one, for uneven and empty shards; the
fetch primitive; refusals raised on every rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import shaped_err
from torch import nn

from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.sharded.distribute import distribute
from nonlocal_dist.sharded.fetch import fetch_plan, fetch_positions
from nonlocal_dist.sharded.tensor import ShardedTensor
from nonlocal_dist.testing import run_ranks

TOL = 1e-13
LAYOUTS = {3: "b c t", 4: "b c t w", 5: "b c t h w"}
# Shard lengths over 3 ranks along t (T = 5): uneven, an empty last rank, an empty first rank.
SIZES = ([4, 1, 0], [0, 2, 3], [2, 2, 1])


def _compare(name: str, fn, shape: tuple, sizes: list[int], seed: int, exact: bool = False) -> list[str]:
    """Run ``fn`` on the whole tensor and on its shards; the problems found (an empty list when none)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    xw = x.clone().requires_grad_()
    yw = fn(xw)
    w = torch.randn(yw.shape, generator=gen, dtype=torch.float64)
    (yw * w).sum().backward()

    xr = x.clone().requires_grad_()
    xs = distribute(xr, dist.group.WORLD, LAYOUTS[len(shape)], "t", sizes=[sizes])
    ys = fn(xs)
    problems = []
    if not isinstance(ys, ShardedTensor):
        return [f"{name} {sizes}: result is a {type(ys).__name__}"]
    shard = ys.spec.sharded[2]
    if ys.shape != yw.shape or shard.total != yw.shape[2]:
        return [f"{name} {sizes}: global shape {tuple(ys.shape)} vs {tuple(yw.shape)}"]
    local = ys.to_local()
    expected = yw.detach().narrow(2, shard.start, shard.local)
    err = shaped_err(local.detach(), expected)
    if (exact and not torch.equal(local.detach(), expected)) or err > TOL:
        problems.append(f"{name} {sizes}: output error {err:.2e} (shard sizes {shard.sizes})")
    (local * w.narrow(2, shard.start, shard.local)).sum().backward()
    grad = xr.grad.clone() if xr.grad is not None else torch.zeros_like(x)
    dist.all_reduce(grad)
    err = shaped_err(grad, xw.grad)
    if err > TOL:
        problems.append(f"{name} {sizes}: input grad error {err:.2e}")
    return problems


PAD_CASES = [
    # (mode, pad, value)
    ("constant", (0, 0, 0, 0, 2, 0), None),  # causal (k - 1, 0)
    ("constant", (1, 1, 1, 1, 2, 3), 1.5),
    ("constant", (0, 0, 0, 0, 6, 7), None),  # wider than every shard and than the tensor
    ("constant", (0, 0, 0, 0, -1, 2), None),  # a crop on the left
    ("constant", (1, 0, 0, 0, -3, -1), -2.0),  # crops wider than a shard
    ("replicate", (0, 0, 0, 0, 2, 0), None),  # causal: the first frame repeated
    ("replicate", (1, 1, 1, 1, 4, 3), None),
    ("replicate", (0, 0, 0, 0, 7, 6), None),
    ("replicate", (0, 0, 0, 0, -1, 2), None),
    ("reflect", (0, 0, 0, 0, 2, 0), None),
    ("reflect", (1, 1, 1, 1, 4, 3), None),
    ("reflect", (1, 1, 1, 1, -2, 3), None),
    ("circular", (0, 0, 0, 0, 2, 0), None),
    ("circular", (1, 1, 1, 1, 5, 3), None),
    ("circular", (0, 0, 0, 0, -1, 2), None),
    ("circular", (0, 0, 0, 0, 2, -2), None),
    ("replicate", (1, 2, 0, 0, 0, 0), None),  # unsharded dims only
]


def _pad_worker(rank, world):
    problems = []
    for sizes in SIZES:
        for i, (mode, pad, value) in enumerate(PAD_CASES):
            kwargs = {} if value is None else {"value": value}

            def fn(t, pad=pad, mode=mode, kwargs=kwargs):
                return F.pad(t, pad, mode=mode, **kwargs)

            problems += _compare(f"pad {mode} {pad}", fn, (2, 2, 5, 4, 3), sizes, 10 + i, exact=True)
        # 1-D (b c t): t is the last dim
        for i, (mode, pad) in enumerate([("reflect", (3, 2)), ("replicate", (2, 5)), ("circular", (4, 1)),
                                         ("constant", (0, 3))]):
            problems += _compare(f"pad1d {mode} {pad}", lambda t, p=pad, m=mode: F.pad(t, p, mode=m),
                                 (2, 3, 5), sizes, 40 + i, exact=True)
        # Convolutions with padding_mode: F.pad then a zero-padding conv.
        for i, mode in enumerate(("reflect", "replicate", "circular")):
            torch.manual_seed(5)
            conv = nn.Conv3d(2, 3, 3, padding=(2, 1, 1), padding_mode=mode).double()
            problems += _compare(f"conv3d padding_mode={mode}", conv, (2, 2, 5, 4, 3), sizes, 50 + i)
    # The new shard lengths of a constant pad: the left pad on the first rank, the right pad on the last.
    x = torch.randn(1, 1, 5, 2, 2, dtype=torch.float64)
    xs = distribute(x, dist.group.WORLD, "b c t h w", "t", sizes=[[0, 2, 3]])
    lengths = F.pad(xs, (0, 0, 0, 0, 2, 1)).spec.sharded[2].sizes
    return problems, lengths


def test_pad_every_mode():
    for problems, lengths in run_ranks(_pad_worker, 3, timeout=120):
        assert not problems, "\n".join(problems)
        assert lengths == (2, 2, 4)


INTERP_1D = [
    # (mode, kwargs)
    ("nearest", {"scale_factor": 2}),
    ("nearest", {"scale_factor": 1.5}),
    ("nearest", {"scale_factor": 0.6}),
    ("nearest", {"size": 11}),
    ("nearest", {"size": 3}),
    ("nearest", {"scale_factor": 2.3, "recompute_scale_factor": True}),
    ("nearest-exact", {"scale_factor": 2}),
    ("nearest-exact", {"scale_factor": 1.7}),
    ("nearest-exact", {"size": 2}),
    ("linear", {"scale_factor": 2}),
    ("linear", {"scale_factor": 2, "align_corners": True}),
    ("linear", {"scale_factor": 1.3}),
    ("linear", {"scale_factor": 0.5}),
    ("linear", {"size": 12, "align_corners": True}),
    ("linear", {"size": 3}),
    ("linear", {"size": 1, "align_corners": True}),
    ("linear", {"size": 5}),  # the identity
    ("linear", {"scale_factor": 2.3, "recompute_scale_factor": True}),
    ("linear", {"scale_factor": 1.6, "align_corners": True, "recompute_scale_factor": False}),
]
INTERP_3D = [
    ("nearest", {"scale_factor": 2}),
    ("nearest", {"scale_factor": (1.5, 1, 2)}),
    ("nearest", {"size": (9, 5, 2)}),
    ("nearest-exact", {"scale_factor": (0.7, 2, 1.5)}),
    ("nearest-exact", {"size": (3, 7, 4)}),
    ("trilinear", {"scale_factor": 2}),
    ("trilinear", {"scale_factor": (1, 2, 2), "align_corners": True}),
    ("trilinear", {"scale_factor": (1.5, 1.2, 2)}),
    ("trilinear", {"size": (3, 7, 4), "align_corners": True}),
    ("trilinear", {"size": (8, 5, 6)}),
    ("trilinear", {"scale_factor": (2.3, 1.5, 1), "recompute_scale_factor": True}),
]
INTERP_2D = [
    ("nearest", {"scale_factor": 2}),
    ("nearest", {"scale_factor": (1.5, 2.5)}),
    ("nearest-exact", {"size": (8, 3)}),
    ("bilinear", {"scale_factor": 2}),
    ("bilinear", {"scale_factor": (1.7, 1.2), "align_corners": True}),
    ("bilinear", {"size": (3, 9)}),
]


def _interpolate_worker(rank, world):
    problems = []
    for sizes in SIZES:
        for cases, shape, seed in ((INTERP_1D, (2, 3, 5), 100), (INTERP_3D, (1, 2, 5, 4, 3), 200),
                                   (INTERP_2D, (2, 2, 5, 4), 300)):
            for i, (mode, kwargs) in enumerate(cases):
                def fn(t, mode=mode, kwargs=kwargs):
                    return F.interpolate(t, mode=mode, **kwargs)

                exact = mode in ("nearest", "nearest-exact")
                name = f"interpolate {len(shape) - 2}d {mode} {kwargs}"
                problems += _compare(name, fn, shape, sizes, seed + i, exact)
        torch.manual_seed(0)
        up = nn.Sequential(nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear"), nn.Conv3d(2, 2, 3, padding=1))
        up = up.double()
        problems += _compare("nn.Upsample + conv", up, (1, 2, 5, 3, 3), sizes, 400)
    # float32 and bfloat16 (blended in float32 and rounded once, as ATen's kernels): outputs only.
    x = torch.randn(1, 2, 5, 4, 3, generator=torch.Generator().manual_seed(500))
    for dtype in (torch.float32, torch.bfloat16):
        for mode, kwargs in (("trilinear", {"scale_factor": (2, 1.5, 2)}), ("trilinear", {"size": (3, 7, 4)}),
                             ("nearest-exact", {"scale_factor": 1.7})):
            xd = x.to(dtype)
            ys = F.interpolate(distribute(xd, dist.group.WORLD, "b c t h w", "t", sizes=[[4, 1, 0]]), mode=mode,
                               **kwargs)
            shard = ys.spec.sharded[2]
            expected = F.interpolate(xd, mode=mode, **kwargs).narrow(2, shard.start, shard.local)
            err = shaped_err(ys.to_local().double(), expected.double())
            if err > 4 * torch.finfo(dtype).eps:
                problems.append(f"{dtype} {mode} {kwargs}: output error {err:.2e}")
    return problems


def test_interpolate_every_mode():
    for problems in run_ranks(_interpolate_worker, 3, timeout=150):
        assert not problems, "\n".join(problems)


def test_fetch_plan():
    # sizes [3, 0, 2]: rank 0 holds 0-2, rank 2 holds 3-4.
    needs = [[4, 4, 0], [1, 3], [2, 3, 2]]
    plan = fetch_plan([3, 0, 2], 0, needs)
    assert [s.tolist() for s in plan.send] == [[], [1], [2]] and plan.recv == (0, 0, 1)
    assert plan.own.tolist() == [0] and plan.order.tolist() == [1, 1, 0]
    plan = fetch_plan([3, 0, 2], 2, needs)
    assert [s.tolist() for s in plan.send] == [[1], [0], []] and plan.recv == (1, 0, 0)
    assert plan.own.tolist() == [0] and plan.order.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        fetch_plan([3, 0, 2], 0, [[5], [], []])


def _fetch_worker(rank, world):
    sizes = [3, 0, 4]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    needs = [[6, 0, 0, 5], [2, 3], [1, 1, 6, 0, 4]]
    start = sum(sizes[:rank])
    xr = x.clone().requires_grad_()
    out = fetch_positions(xr.narrow(1, start, sizes[rank]), 1, needs, sizes, dist.group.WORLD)
    ok = torch.equal(out, x[:, needs[rank]])
    w = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    (out * w[:, : len(needs[rank])]).sum().backward()
    grad = xr.grad.clone()
    dist.all_reduce(grad)
    xw = x.clone().requires_grad_()
    sum((xw[:, n] * w[:, : len(n)]).sum() for n in needs).backward()
    return ok, shaped_err(grad, xw.grad)


def test_fetch_positions_gradient():
    for ok, err in run_ranks(_fetch_worker, 3):
        assert ok and err < TOL


def _refusal_worker(rank, world):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    xs = distribute(x, dist.group.WORLD, "b c t w", "t", sizes=[[3, 2]])
    outcomes = []
    for call in (lambda: F.interpolate(xs, scale_factor=2, mode="bicubic"),
                 lambda: F.interpolate(xs, scale_factor=0.5, mode="area"),
                 lambda: F.interpolate(xs, scale_factor=0.5, mode="bilinear", antialias=True)):
        try:
            call()
            outcomes.append("ran")
        except ShardingRefusal as exc:
            outcomes.append(f"refused: {exc}")
    # Argument errors F.pad raises on the whole tensor are raised on every rank too (no rank waits).
    for call in (lambda: F.pad(xs, (0, 0, 5, 0), mode="reflect"), lambda: F.pad(xs, (0, 0, -6, 0))):
        try:
            call()
            outcomes.append("ran")
        except ValueError as exc:
            outcomes.append(f"error: {exc}")
    # Sharded along the channels, no spatial dim sharded: the op runs locally, unchanged (bicubic too).
    xc = distribute(x, dist.group.WORLD, "b c t w", "c", sizes=[[1, 1]])
    y = F.interpolate(xc, scale_factor=2, mode="bicubic")
    expected = F.interpolate(x, scale_factor=2, mode="bicubic")[:, rank : rank + 1]
    outcomes.append(isinstance(y, ShardedTensor) and y.spec.sharded[1].sizes == (1, 1)
                    and torch.equal(y.to_local(), expected))
    return outcomes


def test_refusals_on_every_rank():
    results = run_ranks(_refusal_worker, 2)
    for outcomes in results:
        assert [o.split(":")[0] for o in outcomes[:5]] == ["refused"] * 3 + ["error"] * 2, outcomes
        assert "F.interpolate along sharded dim 2" in outcomes[0] and "test_resize.py" in outcomes[0]
        assert "bicubic" in outcomes[0] and "area" in outcomes[1] and "antialias" in outcomes[2]
        assert outcomes[5] is True
    assert results[0][:5] == results[1][:5]
