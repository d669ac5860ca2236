"""batch_norm_rows without a group: nn.BatchNorm1d itself in one dtype, float32 statistics under
mixed precision (bf16 parameters, float32 buffers, as DeepSpeed's bf16 engine leaves them).
group_batch_norm on rows and (B, C, *spatial), alone and over gloo ranks: nn.BatchNorm's outputs,
first and second derivatives and running statistics, keeping only what BatchNorm keeps for backward."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_rel
from torch import Tensor, nn

from nonlocal_dist.sharded import batch_norm_rows, group_batch_norm


def _bn() -> nn.BatchNorm1d:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("training", [True, False])
def test_mixed_precision_matches_float64(training):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 3 + 10
    reference, mixed = _bn().double(), _bn()
    mixed.weight.data, mixed.bias.data = mixed.weight.data.bfloat16(), mixed.bias.data.bfloat16()
    with torch.no_grad():  # bf16 parameters for both, so only the computation differs
        reference.weight.copy_(mixed.weight.double())
        reference.bias.copy_(mixed.bias.double())
    reference(x), batch_norm_rows(x.bfloat16(), mixed)  # one training step each
    reference.train(training), mixed.train(training)
    expected = reference(x)
    actual = batch_norm_rows(x.bfloat16(), mixed)
    assert actual.dtype == torch.bfloat16 and mixed.running_mean.dtype == torch.float32
    assert_rel(actual, expected, 2e-2, "output")  # bf16 output rounding
    assert_rel(mixed.running_mean, reference.running_mean, 1e-2, "running mean")  # bf16 input rounding
    assert_rel(mixed.running_var, reference.running_var, 2e-2, "running var")


def test_one_dtype_is_plain_batch_norm():
    x = torch.randn(40, 6, dtype=torch.float64)
    bn = _bn().double()
    twin = copy.deepcopy(bn)
    assert torch.equal(batch_norm_rows(x, bn), twin(x))
    assert torch.equal(bn.running_var, twin.running_var)


def _rows_bn(params_dtype: torch.dtype) -> nn.BatchNorm1d:
    bn = _bn()  # float32 buffers; bf16 parameters as DeepSpeed's bf16 engine leaves them
    bn.weight.data, bn.bias.data = bn.weight.data.to(params_dtype), bn.bias.data.to(params_dtype)
    return bn


@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_no_rows_leave_running_statistics(params_dtype, x_dtype):
    bn = _rows_bn(params_dtype)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    out = batch_norm_rows(torch.randn(0, 6, dtype=x_dtype), bn)
    assert out.shape == (0, 6) and out.dtype == x_dtype
    assert torch.equal(bn.running_mean, before["running_mean"]) and torch.equal(bn.running_var, before["running_var"])
    assert bn.num_batches_tracked == 1  # counted, as nn.BatchNorm1d counts an empty batch


@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_one_row_in_training_raises_in_every_precision(params_dtype, x_dtype):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_rows(torch.randn(1, 6, dtype=x_dtype), _rows_bn(params_dtype))


def _group_rows(rank, world):
    import torch.distributed as dist

    outcomes = []
    for rows_per_rank in ([1, 0], [0, 2], [0, 0]):
        bn = _bn()
        before = bn.running_var.clone()
        try:
            batch_norm_rows(torch.randn(rows_per_rank[rank], 6, dtype=torch.float64), bn, dist.group.WORLD)
        except ValueError as exc:
            outcomes.append(str(exc))
            continue
        outcomes.append("untouched" if torch.equal(bn.running_var, before) else "moved")
    return outcomes


def test_group_counts_rows_over_every_rank():
    from nonlocal_dist.testing import run_ranks

    # One row over the whole group raises on every rank (no rank waits in a collective); a rank
    # with no rows beside one with two is a batch of two; no rows anywhere leaves the statistics.
    for one_row, two_rows, no_rows in run_ranks(_group_rows, 2, timeout=60):
        assert "more than 1 value per channel" in one_row and "sequence-parallel group" in one_row, one_row
        assert (two_rows, no_rows) == ("moved", "untouched")


_SHAPES = {1: (40, 6), 2: (3, 6, 4, 5), 3: (2, 6, 3, 4, 5)}  # BatchNorm1d on rows, 2d, 3d
_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _spatial_bn(spatial: int, momentum: float | None = 0.1) -> nn.modules.batchnorm._BatchNorm:
    torch.manual_seed(0)
    bn = _CLASSES[spatial](6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _first_and_second(y: Tensor, x: Tensor, bn, grad: Tensor, v: Tensor) -> list[Tensor]:
    """dx, dw, db of <y, grad>, then d/dx, d/dw of <dx, v> + <dw, u> (a graph of the backward; linear
    in dx and dw, so over a group the ranks' parts of it sum to the whole batch's)."""
    first = torch.autograd.grad((y * grad).sum(), (x, bn.weight, bn.bias), create_graph=True)
    u = torch.linspace(-1, 1, first[1].numel(), dtype=first[1].dtype)
    second = torch.autograd.grad((first[0] * v).sum() + (first[1] * u).sum(), (x, bn.weight))
    return [t.detach() for t in (*first, *second)]


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_group_batch_norm_alone_is_batch_norm(spatial, momentum):
    bn, twin = _spatial_bn(spatial, momentum), _spatial_bn(spatial, momentum)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(_SHAPES[spatial], generator=gen, dtype=torch.float64) * 3 + 10
    grad, v = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    for _ in range(2):  # the second step moves the cumulative average (momentum None) by 1/2
        xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = group_batch_norm(xs, bn), twin(xt)
    assert_rel(ours, theirs, 1e-13, "output")
    for got, want, what in zip(_first_and_second(ours, xs, bn, grad, v), _first_and_second(theirs, xt, twin, grad, v),
                               ("dx", "dw", "db", "d2x", "d2w")):
        assert_rel(got, want, 1e-12, what)
    for name in ("running_mean", "running_var"):
        assert_rel(getattr(bn, name), getattr(twin, name), 1e-13, name)
    assert bn.num_batches_tracked == twin.num_batches_tracked == 2
    bn.eval(), twin.eval()
    assert_rel(group_batch_norm(x, bn), twin(x), 1e-13, "eval output")


def test_keeps_what_batch_norm_keeps_for_backward():
    # The input (bf16 here), mean and 1/std, weight: not a float32 centred copy and normalised output.
    x = torch.randn(256, 6).bfloat16().requires_grad_()
    bn = _rows_bn(torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = group_batch_norm(x, bn)
    out.float().sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() * x.element_size() + 3 * 6 * 4
    assert x.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.bfloat16


def test_eval_in_half_precision_uses_float32_running_statistics():
    bn = _spatial_bn(3).float()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(_SHAPES[3])
    out = group_batch_norm(x.bfloat16(), bn)
    assert out.dtype == torch.bfloat16
    assert_rel(out, bn(x.bfloat16().float()), 1e-2, "bf16 eval")


def _group_spatial(rank, world):
    import torch.distributed as dist

    x = torch.randn(_SHAPES[2], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 10
    gen = torch.Generator().manual_seed(6)
    grad, v = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    sizes = [3, 1, 0][:world]  # uneven along H, the last rank's shard empty
    split = lambda t: t.split(sizes, dim=2)[rank]  # noqa: E731
    bn = _spatial_bn(2)
    xs = split(x).clone().requires_grad_()
    out = group_batch_norm(xs, bn, dist.group.WORLD)
    derivatives = _first_and_second(out, xs, bn, split(grad), split(v))
    return out.detach(), derivatives, bn.running_mean, bn.running_var


def test_group_spans_every_rank_with_second_derivatives():
    from nonlocal_dist.testing import run_ranks

    results = run_ranks(_group_spatial, 3, timeout=120)
    twin = _spatial_bn(2)
    x = torch.randn(_SHAPES[2], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 10
    gen = torch.Generator().manual_seed(6)
    grad, v = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    x.requires_grad_()
    expected = twin(x)
    assert_rel(torch.cat([r[0] for r in results], dim=2), expected, 1e-13, "output")
    want = _first_and_second(expected, x, twin, grad, v)
    for i, what in enumerate(("dx", "dw", "db", "d2x", "d2w")):
        # Per-position derivatives are this rank's slice; parameter ones this rank's part (sum = whole).
        got = torch.cat([r[1][i] for r in results], dim=2) if what in ("dx", "d2x") else sum(r[1][i] for r in results)
        assert_rel(got, want[i], 1e-12, what)
    for _, _, mean, var in results:
        assert_rel(mean, twin.running_mean, 1e-13, "running mean")
        assert_rel(var, twin.running_var, 1e-13, "running var")
