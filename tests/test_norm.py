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
