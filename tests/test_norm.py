"""batch_norm_rows without a group: nn.BatchNorm1d itself in one dtype, float32 statistics under
mixed precision (bf16 parameters, float32 buffers, as DeepSpeed's bf16 engine leaves them)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_rel
from nonlocal_dist.parallel import batch_norm_rows


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
    from dist_harness import run_ranks

    # One row over the whole group raises on every rank (no rank waits in a collective); a rank
    # with no rows beside one with two is a batch of two; no rows anywhere leaves the statistics.
    for one_row, two_rows, no_rows in run_ranks(_group_rows, 2, timeout=60):
        assert "more than 1 value per channel" in one_row and "sequence-parallel group" in one_row, one_row
        assert (two_rows, no_rows) == ("moved", "untouched")
