"""Index plans of F.interpolate / F.pad along one dim (sharded/resample.py) against torch itself.

Each plan is applied dim by dim (index_select along the dim, then blend; the last spatial dim first,
as ATen's kernel blends) to a float64 tensor and compared with F.interpolate / F.pad on the whole
tensor: 1-D, 2-D and 3-D inputs, every supported mode, size and scale_factor given, with and without
recompute_scale_factor; the float32/float16 opmath and the kernels' rounding quirks have their own
cases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nonlocal_dist.sharded.resample import (
    interpolate_output_size,
    interpolate_sources,
    pad_sources,
)

TOL = 1e-12
MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _input(spatial: tuple[int, ...], dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    batch = (2, 3) if len(spatial) == 1 else (2, 2) if len(spatial) == 2 else (1, 2)
    return torch.randn(*batch, *spatial, generator=gen, dtype=dtype)


def _planned_interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                         recompute_scale_factor=None):
    """F.interpolate rebuilt from the per-dim plans: gather with index_select, then blend."""
    nd = x.dim() - 2
    sizes = size if isinstance(size, (tuple, list)) or size is None else (size,) * nd
    scales = (scale_factor if isinstance(scale_factor, (tuple, list)) or scale_factor is None
              else (scale_factor,) * nd)
    plan_mode = "linear" if mode in MODES.values() else mode
    out = x
    for d in reversed(range(nd)):
        in_len = x.shape[2 + d]
        out_len, kernel_scale = interpolate_output_size(
            in_len, None if sizes is None else sizes[d], None if scales is None else scales[d],
            recompute_scale_factor)
        i0, i1, w1 = interpolate_sources(in_len, out_len, plan_mode, align_corners, kernel_scale,
                                         dtype=x.dtype, spatial_dims=nd)
        assert i0.shape == i1.shape == w1.shape == (out_len,)
        assert i0.dtype == i1.dtype == torch.int64 and w1.dtype == torch.float64
        view = [1] * out.dim()
        view[2 + d] = out_len
        w = w1.to(x.dtype).view(view)
        out = out.index_select(2 + d, i0) * (1 - w) + out.index_select(2 + d, i1) * w
    return out


def _check_interpolate(x, tol=TOL, **kwargs):
    expected = F.interpolate(x, **kwargs)
    got = _planned_interpolate(x, **kwargs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tol, kwargs


# (in_len, out_len) per dim: up, down, identity, from 1, to 1; 2-D/3-D rotate through them.
SIZE_PAIRS = [(5, 13), (13, 5), (7, 7), (1, 4), (4, 1)]
SCALES = [2, 0.5, 1.5, 3, 0.3, (1, 2, 2)]
MODE_CASES = [("nearest", None), ("nearest-exact", None), ("linear", False), ("linear", True)]


def _mode(name: str, nd: int) -> str:
    return MODES[nd] if name == "linear" else name


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode,align_corners", MODE_CASES)
@pytest.mark.parametrize("shift", range(len(SIZE_PAIRS)))
def test_interpolate_size_matches_torch(nd, mode, align_corners, shift):
    pairs = [SIZE_PAIRS[(shift + k) % len(SIZE_PAIRS)] for k in range(nd)]
    x = _input(tuple(p[0] for p in pairs), seed=shift)
    _check_interpolate(x, size=tuple(p[1] for p in pairs), mode=_mode(mode, nd),
                       align_corners=align_corners)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode,align_corners", MODE_CASES)
@pytest.mark.parametrize("scale", SCALES, ids=str)
@pytest.mark.parametrize("recompute", [None, True])
def test_interpolate_scale_factor_matches_torch(nd, mode, align_corners, scale, recompute):
    spatial = (13, 7, 9)[:nd] if nd < 3 else (5, 7, 9)
    if isinstance(scale, tuple):
        scale = scale[:nd]
    x = _input(spatial, seed=nd)
    _check_interpolate(x, scale_factor=scale, mode=_mode(mode, nd), align_corners=align_corners,
                       recompute_scale_factor=recompute)


@pytest.mark.parametrize("mode,align_corners", MODE_CASES)
def test_interpolate_recompute_false_and_sweep_1d(mode, align_corners):
    """recompute_scale_factor=False is the default path; plus a sweep of 1-D sizes and scales."""
    for in_len in range(1, 18):
        x = _input((in_len,), seed=in_len)
        for out_len in range(1, 30, 3):
            _check_interpolate(x, size=out_len, mode=mode, align_corners=align_corners)
        for scale in (0.3, 0.7, 1.1, 1.3, 2.5, 2 / 3, 4.7):
            if int(in_len * scale) >= 1:
                _check_interpolate(x, scale_factor=scale, mode=mode, align_corners=align_corners,
                                   recompute_scale_factor=False)


def test_nearest_kernels_differ_between_1d_3d_and_2d():
    """upsample_nearest2d uses nearest_idx (float32 ratio, in==out and out==2*in shortcuts); the
    1-D/3-D kernel uses the opmath ratio: 14 -> 46 in float64 takes different indices."""
    one = interpolate_sources(14, 46, "nearest", None, None, spatial_dims=1)[0]
    two = interpolate_sources(14, 46, "nearest", None, None, spatial_dims=2)[0]
    assert not torch.equal(one, two)
    for nd in (1, 2, 3):
        x = _input((14,) + (3,) * (nd - 1))
        _check_interpolate(x, size=(46,) + (3,) * (nd - 1), mode="nearest")
        # scale_factor 1.1 on 2 positions: output size 2; identity for 2-D only
        x = _input((2,) + (3,) * (nd - 1))
        _check_interpolate(x, scale_factor=(1.1,) + (1.0,) * (nd - 1), mode="nearest")


def test_channels_last_2d_nearest_and_linear():
    x = _input((14, 9)).contiguous(memory_format=torch.channels_last)
    for mode, ac in (("nearest", None), ("nearest-exact", None), ("bilinear", False), ("bilinear", True)):
        _check_interpolate(x, size=(46, 41), mode=mode, align_corners=ac)


@pytest.mark.parametrize("align_corners", [False, True])
def test_linear_index_is_rounded_to_float32_before_floor(align_corners):
    """ATen floors floorf(src): src just below an integer n rounds to n in float32 even for float64
    inputs, so the plan takes (n, weight 0); an exact floor would take (n - 1, weight ~1) and differ
    by ~1e-4 here."""
    in_len, out_len = 6000, 5999
    i0, _, w1 = interpolate_sources(in_len, out_len, "linear", align_corners, None)
    ratio = (in_len - 1) / (out_len - 1) if align_corners else in_len / out_len
    o = torch.arange(out_len, dtype=torch.float64)
    src = ratio * o if align_corners else (ratio * (o + 0.5) - 0.5).clamp_min(0)
    assert (src.floor().long() != i0).any()
    _check_interpolate(_input((in_len,)), size=out_len, mode="linear", align_corners=align_corners)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("mode,align_corners", MODE_CASES)
def test_low_precision_opmath(dtype, tol, mode, align_corners):
    """float32/float16 inputs: the ratio and indices in float32 (nearest-exact 2 -> 41 hits the
    fused-multiply-add rounding); indices must match, values up to the dtype's rounding."""
    for spatial, size in (((2,), (41,)), ((14,), (46,)), ((5, 7), (13, 3)), ((4, 5, 6), (9, 2, 13))):
        x = _input(spatial, dtype=dtype)
        nd = len(spatial)
        _check_interpolate(x, tol=tol, size=size, mode=_mode(mode, nd), align_corners=align_corners)
        _check_interpolate(x, tol=tol, scale_factor=1.7, mode=_mode(mode, nd), align_corners=align_corners)


def test_fused_and_unfused_plans():
    """nearest-exact 2 -> 41 in float32: output 20 reads input 1 with an FMA, input 0 without."""
    fused = interpolate_sources(2, 41, "nearest-exact", None, None, dtype=torch.float32, fused=True)[0]
    plain = interpolate_sources(2, 41, "nearest-exact", None, None, dtype=torch.float32, fused=False)[0]
    assert fused[20].item() == 1 and plain[20].item() == 0
    # float64 linear: the two agree to an ulp of src
    a = interpolate_sources(48, 23, "linear", False, None, fused=True)
    b = interpolate_sources(48, 23, "linear", False, None, fused=False)
    assert torch.equal(a[0], b[0]) and (a[2] - b[2]).abs().max().item() < 1e-13


@pytest.mark.parametrize(
    "in_len,size,scale,recompute",
    [(10, 7, None, None), (5, None, 2.0, None), (5, None, 2.0, True), (100, None, 0.29, None),
     (100, None, 0.29, True), (100, None, 0.57, False), (13, None, 0.3, None), (7, None, 1.0, None)],
)
def test_output_size_matches_torch(in_len, size, scale, recompute):
    out_len, kernel_scale = interpolate_output_size(in_len, size, scale, recompute)
    x = torch.zeros(1, 1, in_len)
    assert F.interpolate(x, size=size, scale_factor=scale, recompute_scale_factor=recompute).shape[-1] == out_len
    assert kernel_scale == (scale if scale is not None and not recompute else None)


def test_interpolate_errors():
    with pytest.raises(ValueError, match="only one"):
        interpolate_output_size(5, 3, 2.0, None)
    with pytest.raises(ValueError, match="either"):
        interpolate_output_size(5, None, None, None)
    with pytest.raises(ValueError, match="recompute_scale_factor"):
        interpolate_output_size(5, 3, None, True)
    with pytest.raises(ValueError, match="greater than 0"):
        interpolate_output_size(3, None, 0.3, None)
    with pytest.raises(ValueError, match="align_corners"):
        interpolate_sources(5, 7, "nearest", True, None)
    with pytest.raises(ValueError, match="mode"):
        interpolate_sources(5, 7, "bicubic", False, None)


# ---------------------------------------------------------------------------------------------- pad

def _planned_pad(x, pads, mode, value=0.0):
    """F.pad rebuilt from pad_sources: index_select along each dim (-1 -> the fill value)."""
    nd = len(pads) // 2
    out = x
    for k in range(nd):
        d = out.dim() - 1 - k
        left, right = pads[2 * k], pads[2 * k + 1]
        src = pad_sources(out.shape[d], left, right, mode)
        assert src.dtype == torch.int64 and src.shape == (left + out.shape[d] + right,)
        if mode == "constant":
            fill_shape = list(out.shape)
            fill_shape[d] = 1
            out = torch.cat([out, torch.full(fill_shape, value, dtype=out.dtype)], dim=d)
            src = torch.where(src < 0, out.shape[d] - 1, src)
        out = out.index_select(d, src)
    return out


PAD_SETS = {
    1: [(0, 2), (3, 1), (2, 0), (0, 0), (4, 4)],
    2: [(0, 2, 3, 1), (1, 0, 0, 2), (2, 3, 0, 0), (0, 0, 3, 4)],
    3: [(0, 2, 3, 1, 1, 0), (1, 0, 0, 2, 2, 3), (0, 0, 1, 0, 0, 4)],
}


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_pad_matches_torch(mode, nd):
    x = _input((5, 6, 7)[-nd:] if nd > 1 else (5,))
    for pads in PAD_SETS[nd]:
        expected = F.pad(x, pads, mode=mode, value=2.5) if mode == "constant" else F.pad(x, pads, mode=mode)
        got = _planned_pad(x, pads, mode, value=2.5)
        assert torch.equal(got, expected), (mode, pads)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
@pytest.mark.parametrize("left,right", [(-1, 2), (2, -1), (-2, -2), (-3, 4), (4, -3), (-3, 2), (-1, 4), (3, -2)])
def test_pad_negative_crops_like_torch(mode, left, right):
    x = _input((6,))
    kept = 6 + min(left, 0) + min(right, 0)
    if mode == "circular" and max(left, right) > kept:
        # F.pad crops first, then wraps: a pad longer than the cropped dim raises on a (1, 1, L)
        # input and returns uninitialised memory on a batched one (torch 2.13); the plan refuses it.
        with pytest.raises(ValueError, match=f"pad <= {kept}"):
            pad_sources(6, left, right, mode)
        return
    try:
        expected = F.pad(x, (left, right), mode=mode)
    except RuntimeError:
        with pytest.raises(ValueError):
            pad_sources(6, left, right, mode)
        return
    assert torch.equal(_planned_pad(x, (left, right), mode), expected)


def test_pad_sources_values_and_errors():
    assert pad_sources(5, 2, 3, "reflect").tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert pad_sources(5, 2, 3, "replicate").tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    assert pad_sources(5, 2, 3, "circular").tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    assert pad_sources(5, 2, 3, "constant").tolist() == [-1, -1, 0, 1, 2, 3, 4, -1, -1, -1]
    assert pad_sources(5, 5, 5, "circular").tolist() == [0, 1, 2, 3, 4] * 3
    x = torch.zeros(1, 1, 5)
    for mode, left, right, match in (("reflect", 5, 0, "expected left pad < 5, got left=5"),
                                     ("reflect", 0, 7, "expected right pad < 5, got right=7"),
                                     ("circular", 6, 0, "expected left pad <= 5.*got left=6")):
        with pytest.raises(RuntimeError):
            F.pad(x, (left, right), mode=mode)
        with pytest.raises(ValueError, match=match):
            pad_sources(5, left, right, mode)
    with pytest.raises(ValueError, match="non-empty"):
        pad_sources(0, 1, 1, "replicate")
    with pytest.raises(ValueError, match="mode"):
        pad_sources(5, 1, 1, "wrap")
