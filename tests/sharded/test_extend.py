"""Declaring one's own ops: a custom autograd.Function on a sharded activation is refused in forward
on every rank, naming it and the fix, until declared position-wise (then exact against one process,
gradients included); ``register_rule`` and ``local_map`` likewise."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nonlocal_dist import parallelize
from nonlocal_dist.sharded import (
    ShardingRefusal,
    local_map,
    positionwise,
    register_rule,
)
from nonlocal_dist.testing import run_ranks


class Swish(torch.autograd.Function):
    """x sigmoid(x) with a hand-written backward (pytorchvideo's X3D has one like it)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s * (1 + x * (1 - s))


class Shift(torch.autograd.Function):
    """Not position-wise (rolls along t): left undeclared it must stay refused."""

    @staticmethod
    def forward(ctx, x):
        return x.roll(1, 2)

    @staticmethod
    def backward(ctx, grad):
        return grad.roll(-1, 2)


def _scale(x, k):
    return x * k


class Net(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.conv, self.fn, self.pool = nn.Conv3d(2, 3, 3, padding=1), fn, nn.AdaptiveAvgPool3d(1)

    def forward(self, x):
        return self.pool(self.fn(self.conv(x))).flatten(1)


def _shift_rule(op):
    raise op.refuse("rolls along t", fix="a halo rule")


def _extend_worker(rank, world):
    x = torch.randn(2, 2, 7, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outcomes = {}
    for name, fn in [("swish", Swish.apply), ("shift", Shift.apply), ("scale", lambda t: local_map(_scale)(t, 3.0))]:
        torch.manual_seed(0)
        net = Net(fn).double()
        xr = x.clone().requires_grad_(True)
        want = net(xr)
        want.sum().backward()
        want_grad = xr.grad
        parallelize(net, dist.group.WORLD, "t", sizes=[[4, 0, 3][:world] if world == 3 else [4, 3]])
        xs = x.clone().requires_grad_(True)
        try:
            got = net(xs)
        except ShardingRefusal as exc:
            outcomes[name] = str(exc)
            if name == "swish":  # declared, it runs
                positionwise(Swish)
                got = net(xs)
            else:
                continue
        (got.sum() / world).backward()  # the loss convention: each rank's gradient is then its part
        grad = xs.grad.clone()
        dist.all_reduce(grad)
        outcomes[name + " error"] = max((got - want).abs().max().item(), (grad - want_grad).abs().max().item())
    register_rule(Shift, _shift_rule)
    torch.manual_seed(0)
    net = parallelize(Net(Shift.apply).double(), dist.group.WORLD, "t")
    try:
        net(x)
    except ShardingRefusal as exc:
        outcomes["registered"] = str(exc)
    return outcomes


def test_custom_functions_refused_until_declared_then_exact():
    results = run_ranks(_extend_worker, 3, timeout=120)
    for outcomes in results:
        assert "Swish.apply" in outcomes["swish"] and "positionwise(Swish)" in outcomes["swish"], outcomes["swish"]
        assert "test_extend.py" in outcomes["swish"]  # the user's line
        assert outcomes["swish error"] < 1e-12, outcomes
        assert "Shift.apply" in outcomes["shift"] and "shift error" not in outcomes
        assert outcomes["scale error"] < 1e-12, outcomes
        assert "rolls along t" in outcomes["registered"] and "a halo rule" in outcomes["registered"]
    assert len({r["swish"] for r in results}) == 1  # the same refusal on every rank


class Gate(torch.autograd.Function):
    """x * sigmoid(y): position-wise in two operands."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * torch.sigmoid(y)

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        s = torch.sigmoid(y)
        return grad * s, grad * x * s * (1 - s)


def _two_operand_worker(rank, world):
    from nonlocal_dist.sharded import distribute, full_tensor

    g = torch.Generator().manual_seed(2)
    x, y, w = (torch.randn(1, 2, 7, 3, dtype=torch.float64, generator=g) for _ in range(3))
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    want = Gate.apply(xr, yr)
    (want * w).sum().backward()
    positionwise(Gate)
    outcomes = {}
    # two operands sharded alike by separate calls (distinct spec objects, the same split): exact,
    # input gradients too (each rank's part, summed over ranks, under the loss convention)
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xs, ys = (distribute(t, dist.group.WORLD, "b c t w", "t") for t in (xg, yg))
    got = full_tensor(Gate.apply(xs, ys))
    ((got * w).sum() / world).backward()
    grads = [t.grad.clone() for t in (xg, yg)]
    for grad in grads:
        dist.all_reduce(grad)
    outcomes["alike"] = max((got - want).abs().max().item(),
                            *((a - b).abs().max().item() for a, b in zip(grads, (xr.grad, yr.grad))))
    # split differently: refused on every rank
    ys = distribute(y, dist.group.WORLD, "b c t w", "t", sizes=[[1] * (world - 1) + [7 - (world - 1)]])
    try:
        Gate.apply(xs, ys)
    except ShardingRefusal as exc:
        outcomes["differently"] = str(exc)
    return outcomes


def test_a_positionwise_op_runs_operands_split_alike_and_refuses_others():
    results = run_ranks(_two_operand_worker, 3, timeout=120)
    for outcomes in results:
        assert outcomes["alike"] < 1e-15, outcomes
        assert "sharded differently" in outcomes["differently"], outcomes
    assert len({r["differently"] for r in results}) == 1
