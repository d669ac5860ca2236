"""NonLocalBlock against an independent float64 oracle, over modes, axes, sub-sampling and heads."""
from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from helpers import assert_rel
from nonlocal_dist import MODES, NonLocalBlock
from oracle import oracle_block

VIDEO = (2, 8, 3, 5, 7)
AXES_CASES = [
    ("t h w", None),
    ("t h w", {"h": 2, "w": 2}),
    ("t h w", {"t": 2, "w": 3}),
    ("h w", {"h": 2, "w": 2}),
    ("h w", None),
    ("t", None),
    ("w", {"w": 2}),
]


def _randomised(block: NonLocalBlock, seed: int = 0) -> NonLocalBlock:
    """Move the block off its identity initialisation so that every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        if block.norm is not None:
            block.norm.running_mean.uniform_(-0.5, 0.5, generator=gen)
            block.norm.running_var.uniform_(0.5, 1.5, generator=gen)
    return block


def _run(block, x, grad, fn=None):
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    z = (fn or block)(*((block, x) if fn else (x,)))
    z.backward(grad.to(z.dtype))
    return z, x.grad, {name: p.grad for name, p in block.named_parameters()}


def _check_against_oracle(block, x, train, tol=1e-5):
    """float64 block == oracle to 1e-9; float32 block within ``tol`` of the oracle.

    float32 parameter gradients are compared relative to the largest parameter gradient: a gradient
    that is analytically zero (g's bias under training-mode BatchNorm) is a sum of cancelling
    terms, so its float32 value is rounding noise on the scale of the others.
    """
    block.train(train)
    block64 = copy.deepcopy(block).double()
    grad = torch.randn(x.shape, dtype=torch.float64)
    z_o, dx_o, dp_o = _run(copy.deepcopy(block64), x.double(), grad, oracle_block)
    z_64, dx_64, dp_64 = _run(block64, x.double(), grad)
    z_32, dx_32, dp_32 = _run(block, x, grad)
    grad_scale = max(g.abs().max().item() for g in dp_o.values())
    for name, z, dx, dp, tolerance in (("float64", z_64, dx_64, dp_64, 1e-9), ("float32", z_32, dx_32, dp_32, tol)):
        assert_rel(z, z_o, tolerance, f"{name} z")
        assert_rel(dx, dx_o, tolerance, f"{name} dx")
        for key in dp_o:
            assert_rel(dp[key], dp_o[key], tolerance, f"{name} d{key}", floor=grad_scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axes,sub_sample", AXES_CASES)
@pytest.mark.parametrize("heads", [1, 2])
def test_video_block_matches_oracle(mode, axes, sub_sample, heads):
    torch.manual_seed(0)
    block = _randomised(NonLocalBlock(8, axes=axes, mode=mode, sub_sample=sub_sample, heads=heads, use_scale=heads == 2))
    _check_against_oracle(block, torch.randn(*VIDEO), train=True)
    _check_against_oracle(block, torch.randn(*VIDEO), train=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "layout,shape,kwargs",
    [
        ("b n c", (3, 11, 6), {"norm": None}),
        ("b n c", (2, 1, 6), {}),
        ("b h w c", (2, 5, 4, 6), {"sub_sample": True}),
        ("b c n", (2, 6, 9), {"sub_sample": True, "inter_channels": 4}),
    ],
)
def test_other_layouts_match_oracle(mode, layout, shape, kwargs):
    torch.manual_seed(1)
    block = _randomised(NonLocalBlock(6, layout=layout, mode=mode, **kwargs))
    _check_against_oracle(block, torch.randn(*shape), train=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["batch", None])
def test_new_block_is_identity(mode, norm):
    block = NonLocalBlock(8, mode=mode, norm=norm, sub_sample=True)
    x = torch.randn(*VIDEO)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("mode", MODES)
def test_temporal_axes_equal_rearranged_sequence(mode):
    torch.manual_seed(2)
    temporal = _randomised(NonLocalBlock(8, axes="t", mode=mode)).eval()
    sequence = NonLocalBlock(8, layout="b n c", mode=mode).eval()
    sequence.load_state_dict(temporal.state_dict())
    x = torch.randn(*VIDEO)
    b, c, t, h, w = x.shape
    as_sequence = rearrange(x, "b c t h w -> (b h w) t c")
    expected = rearrange(sequence(as_sequence), "(b h w) t c -> b c t h w", b=b, h=h, w=w)
    torch.testing.assert_close(temporal(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_block_within_stated_tolerance(mode):
    torch.manual_seed(3)
    block = _randomised(NonLocalBlock(8, mode=mode, sub_sample=True)).eval()
    x = torch.randn(*VIDEO)
    z = copy.deepcopy(block).bfloat16()(x.bfloat16())
    assert z.dtype == torch.bfloat16
    assert_rel(z, oracle_block(copy.deepcopy(block).double(), x.double()), 2e-2, "bf16 z")


def test_large_inputs_sub_sampled_axes_of_odd_size():
    block = _randomised(NonLocalBlock(4, mode="gaussian", sub_sample={"h": 2, "w": 3}))
    x = torch.randn(1, 4, 2, 5, 7) * 3
    _check_against_oracle(block, x, train=True)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"layout": "n c"}, ValueError, "must contain the batch axis 'b'"),
        ({"layout": "b t h w"}, ValueError, "missing 'c'"),
        ({"layout": "b c"}, ValueError, "no position axis"),
        ({"layout": "b c t t"}, ValueError, "repeats axis 't'"),
        ({"axes": "t z"}, ValueError, "'z' not a position axis"),
        ({"axes": "h h"}, ValueError, "repeats axis 'h'"),
        ({"axes": "c"}, ValueError, "'c' not a position axis"),
        ({"mode": "gaussain"}, ValueError, "unknown mode"),
        ({"backend": "cuda"}, ValueError, "unknown backend"),
        ({"heads": 3}, ValueError, "heads=3 must divide"),
        ({"sub_sample": {"z": 2}}, ValueError, "not among the interacting axes"),
        ({"sub_sample": {"h": 0}}, ValueError, "positive int"),
        ({"sub_sample": 2}, TypeError, "sub_sample must be"),
        ({"norm": "layer"}, ValueError, "norm must be"),
        ({"layout": 5}, TypeError, "layout must be a string"),
    ],
)
def test_bad_construction_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        NonLocalBlock(8, **kwargs)


def test_bad_input_raises():
    block = NonLocalBlock(8)
    with pytest.raises(ValueError, match="expected 8 channels on axis 'c'"):
        block(torch.randn(2, 6, 3, 4, 4))
    with pytest.raises(ValueError, match="names 5 axes but the input has shape \\(2, 8, 4, 4\\)"):
        block(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="leaves no positions"):
        NonLocalBlock(8, sub_sample={"h": 4})(torch.randn(1, 8, 2, 3, 3))
