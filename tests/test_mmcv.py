"""mmcv's NonLocal1d/2d/3d and interop.block_from_mmcv give the same output; what it refuses, and why."""
from __future__ import annotations

import pytest
import torch

from torch import nn

from nonlocal_dist.interop import block_from_mmcv

non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
SHAPES = {1: (2, 8, 9), 2: (2, 8, 6, 5), 3: (2, 8, 3, 6, 5)}


def _mmcv_block(dims: int, mode: str, sub_sample: bool, use_scale: bool, with_norm: bool):
    cls = {1: non_local.NonLocal1d, 2: non_local.NonLocal2d, 3: non_local.NonLocal3d}[dims]
    norm_cfg = {"type": f"BN{dims}d"} if with_norm else None
    module = cls(8, mode=mode, sub_sample=sub_sample, use_scale=use_scale, norm_cfg=norm_cfg).double()
    torch.manual_seed(1)
    with torch.no_grad():  # leave the identity init: random weights everywhere, norm stats included
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if with_norm:
            module.conv_out.bn.running_mean.uniform_(-1, 1)
            module.conv_out.bn.running_var.uniform_(0.5, 2)
    return module


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("with_norm", [False, True])
def test_from_mmcv_module_matches(mode, dims, sub_sample, with_norm):
    module = _mmcv_block(dims, mode, sub_sample, use_scale=True, with_norm=with_norm)
    block = block_from_mmcv(module).double()
    x = torch.randn(*SHAPES[dims], dtype=torch.float64)
    for train in (False, True):
        module.train(train)
        block.train(train)
        expected = module(x.clone())
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation", "gaussian"])
@pytest.mark.parametrize("use_scale", [False, True])
def test_from_mmcv_state_dict_matches(mode, use_scale):
    module = _mmcv_block(3, mode, sub_sample=True, use_scale=use_scale, with_norm=True).eval()
    block = block_from_mmcv(module.state_dict(), mode=mode, use_scale=use_scale).double().eval()
    x = torch.randn(*SHAPES[3], dtype=torch.float64)
    torch.testing.assert_close(block(x), module(x.clone()), rtol=1e-10, atol=1e-10)


def test_from_mmcv_state_dict_needs_mode_when_ambiguous():
    state = _mmcv_block(2, "dot_product", False, True, False).state_dict()
    with pytest.raises(ValueError, match="embedded_gaussian.*dot_product"):
        block_from_mmcv(state)
    with pytest.raises(ValueError, match="concatenation"):
        block_from_mmcv(_mmcv_block(2, "concatenation", False, True, False).state_dict(), mode="dot_product")
    with pytest.raises(TypeError, match="state dict"):
        block_from_mmcv(42)


def test_a_module_that_is_not_an_mmcv_block_is_refused():
    with pytest.raises(TypeError, match="expects an mmcv NonLocal1d/2d/3d module .* got a Linear, which has no mode"):
        block_from_mmcv(nn.Linear(4, 4))


def test_group_norm_after_conv_out_is_refused_with_the_supported_norms():
    module = non_local.NonLocal2d(8, norm_cfg={"type": "GN", "num_groups": 2})
    with pytest.raises(ValueError, match="conv_out with GroupNorm; only BatchNorm .* or no norm"):
        block_from_mmcv(module)
    with pytest.raises(ValueError, match="only BatchNorm .* found \\['conv_out.gn.bias', 'conv_out.gn.weight'\\]"):
        block_from_mmcv(module.state_dict(), mode="embedded_gaussian")


def test_settings_of_a_module_cannot_be_overridden():
    module = _mmcv_block(2, "embedded_gaussian", False, use_scale=True, with_norm=False)
    with pytest.raises(ValueError, match="mode='dot_product' differs from the mmcv module's own mode='embedded_gaussian'"):
        block_from_mmcv(module, mode="dot_product")
    with pytest.raises(ValueError, match="use_scale=False differs"):
        block_from_mmcv(module, use_scale=False)
    x = torch.randn(*SHAPES[2], dtype=torch.float64)
    same = block_from_mmcv(module, mode="embedded_gaussian", use_scale=True).double()
    torch.testing.assert_close(same(x), module(x.clone()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [False, True])
def test_the_copy_keeps_the_source_train_or_eval_mode(training):
    module = _mmcv_block(3, "dot_product", True, use_scale=True, with_norm=True).train(training)
    block = block_from_mmcv(module).double()
    assert block.training == training
    x = torch.randn(*SHAPES[3], dtype=torch.float64)
    torch.testing.assert_close(block(x), module(x.clone()), rtol=1e-10, atol=1e-10)
