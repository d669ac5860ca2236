"""Edges of NonLocalBlock a demanding user hits: gradcheck and functions returning no gradient,
torch.func transforms, NumPy arguments, any legal axis name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_rel
from nonlocal_dist import MODES, NonLocalBlock, nonlocal_op
from oracle import oracle_block


def _block(mode: str, **kwargs) -> NonLocalBlock:
    torch.manual_seed(0)
    block = NonLocalBlock(4, layout="b n c", mode=mode, **kwargs).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return block


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_with_defaults(mode, train):
    # gradcheck's defaults include check_undefined_grad: the BatchNorm gradient hook is handed None.
    block = _block(mode).train(train)
    assert torch.autograd.gradcheck(block, (torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True),))


class _NoGradient(torch.autograd.Function):
    """Identity whose backward returns no gradient (as a user's custom function may)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_downstream_function_returning_no_gradient():
    block = _block("embedded_gaussian")
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    # The block's branch gets an undefined gradient (None reaches its BatchNorm gradient hook).
    (_NoGradient.apply(block(x)).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("mode", MODES)
def test_torch_func_jacrev_and_vmap_over_a_block(mode):
    block = _block(mode).eval()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    jacobian = torch.func.jacrev(block)(x)
    expected = torch.func.jacrev(lambda t: oracle_block(block, t))(x)
    assert_rel(jacobian, expected, 1e-10, "jacobian")
    stacked = torch.stack([x, 2 * x, -x])
    assert_rel(torch.func.vmap(block)(stacked), torch.stack([block(t) for t in stacked]), 1e-12, "vmap")


@pytest.mark.parametrize("mode", MODES)
def test_torch_func_over_training_batch_norm(mode):
    block = _block(mode).train()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        torch.func.vmap(block)(x[None])
    torch.func.replace_all_batch_norm_modules_(block)  # batch statistics only: transforms then run
    assert_rel(torch.func.vmap(block)(x[None])[0], block(x), 1e-12, "vmap")
    assert torch.func.jacrev(block)(x).shape == (2, 5, 4, 2, 5, 4)


def test_numpy_integers_are_ints():
    block = NonLocalBlock(np.int64(8), inter_channels=np.int32(4), heads=np.int64(2), sub_sample={"h": np.int64(2)})
    twin = NonLocalBlock(8, inter_channels=4, heads=2, sub_sample={"h": 2})
    assert (block.in_channels, block.inter_channels, block.heads, block.sub_sample) == (8, 4, 2, {"h": 2})
    assert type(block.in_channels) is int and repr(block) == repr(twin)
    theta, phi, g = torch.randn(2, 6, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    assert torch.equal(nonlocal_op(theta, phi, g, scale=np.float32(0.5)), nonlocal_op(theta, phi, g, scale=0.5))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"in_channels": 8.0}, TypeError, "in_channels must be an int .*got 8.0 \\(float\\)"),
        ({"in_channels": np.float64(8)}, TypeError, "in_channels must be an int"),
        ({"in_channels": True}, TypeError, "in_channels must be an int"),
        ({"in_channels": np.int64(0)}, ValueError, "in_channels must be a positive int, got 0"),
        ({"heads": 2.0}, TypeError, "heads must be an int"),
        ({"inter_channels": "4"}, TypeError, "inter_channels must be an int"),
        ({"sub_sample": {"h": 2.0}}, TypeError, "sub_sample\\['h'\\] must be an int"),
        ({"mode": None}, TypeError, "mode must be a string"),
        ({"backend": ["auto"]}, TypeError, "backend must be a string"),
    ],
)
def test_bad_argument_types_raise_the_librarys_errors(kwargs, error, match):
    kwargs = {"in_channels": 8, **kwargs}
    with pytest.raises(error, match=match):
        NonLocalBlock(kwargs.pop("in_channels"), **kwargs)


@pytest.mark.parametrize(
    "concat_weight,match",
    [(torch.ones(8, dtype=torch.int64), "got a torch.int64 tensor"), (1, "got int"), (np.ones(8), "got ndarray")],
)
def test_non_float_concat_weight_raises_type_error(concat_weight, match):
    theta, phi, g = torch.randn(2, 6, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match=f"concat_weight must be a floating-point torch.Tensor, {match}"):
        nonlocal_op(theta, phi, g, "concatenation", concat_weight=concat_weight)


@pytest.mark.parametrize("layout,sub_sample", [("b c h h_k", {"h": 2, "h_k": 2}), ("b c k0 a0", {"k0": 2, "a0": 3})])
def test_any_legal_axis_name_with_sub_sampling(layout, sub_sample):
    block = NonLocalBlock(4, layout=layout, sub_sample=sub_sample, mode="dot_product").double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 4, 4, 6, dtype=torch.float64)
    assert_rel(block(x), oracle_block(block, x), 1e-12, "z")
