"""``F.pad`` (every mode) and ``F.interpolate`` (``nn.Upsample``) on sharded activations, exact.

Along unsharded dims both run locally (torch's own kernels). Along a sharded dim every rank
computes, from the spec alone, the global index plan of the op (``sharded/resample.py``: the
source position of every padded position, the sources and weights of every interpolated one),
which outputs each rank owns, and which input positions each rank reads; positions held by other
ranks come by one differentiable all-to-all (``sharded/fetch.py``). The result's spec is known on
every rank without a collective.

``F.pad`` (this rule supersedes the constant-only one of ``ops/pad.py``, registered before it).
Output position ``j`` of a sharded dim stands for input coordinate ``p = j - left``; rank r owns
the outputs whose ``p`` lies in its shard, the group's first rank also those before the tensor
(the left pad) and its last rank those after it (the right pad), even where their shards are
empty. So non-negative pads give shard lengths ``sizes[0] + left`` and ``sizes[-1] + right``; a
negative pad (a crop) removes the positions it crops from whichever ranks hold them (no
communication). A constant pad is filled locally; reflect/replicate/circular pads read their
values from the ranks that own the source positions (one ``fetch_positions`` per padded sharded
dim, skipped by every rank alike when all sources are local). Pads along unsharded dims are
applied first, locally, so the edge positions fetched along a sharded dim carry them (corners).
``nn.Conv*d(padding_mode="reflect" | "replicate" | "circular")`` calls ``F.pad`` and then the
convolution with zero padding, so it runs sharded too.

``F.interpolate`` (modes nearest, nearest-exact, linear, bilinear, trilinear; ``size`` or
``scale_factor``; ``align_corners``; ``recompute_scale_factor``). Along a sharded spatial dim with
global plan ``(i0, i1, w1)`` (``out[o] = x[i0[o]] (1 - w1[o]) + x[i1[o]] w1[o]``), rank r owns the
outputs ``o`` whose place in the input, ``floor(o * in / out)``, lies in its shard (a contiguous
range; for an integer factor ``s`` exactly ``[a_r s, (a_r + L_r) s)``, so an upsampled decoder
activation is split as the encoder's skip was before its strided layer), and reads the sources of
its outputs, its own positions plus at most one or two positions of each neighbouring shard,
by one ``fetch_positions`` (skipped by every rank alike when all reads are local). A rank may own
no output (an empty shard; a short shard when downsampling). The spatial dims are resampled one after the
other, the LAST dim first (the order in which ATen's kernels blend), runs of unsharded dims by
ATen's kernel with the other dims' sizes unchanged (an exact identity along them) and each sharded
dim by the plan: ``addcmul(x[i1] * w1, x[i0], w0)``, the arithmetic of ATen's CPU ``linear`` and
``trilinear`` kernels (bit-identical on this build; ATen's bilinear kernel rounds its 2-D blend
differently, a few ulps apart). For float16/bfloat16 the interpolating modes blend every spatial
dim by the plans in float32 with the weights rounded as ATen stores them, and round once at the
end, as ATen does. Refused along a sharded dim: modes area/bicubic, ``antialias=True``, and
non-floating dtypes.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

import nonlocal_dist.distributed.failure as failure
from nonlocal_dist.sharded.fetch import fetch_positions
from nonlocal_dist.sharded.halo import constant_pad, edge_fill
from nonlocal_dist.sharded.resample import (
    interpolate_output_size,
    interpolate_sources,
    pad_sources,
)
from nonlocal_dist.sharded.rules.common import bind, on_piece
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule

_PAD_MODES = ("constant", "reflect", "replicate", "circular")
# (padded dims, input dims) that F.pad's non-constant modes accept.
_NON_CONSTANT_SHAPES = {(1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5)}
_NEAREST = ("nearest", "nearest-exact")
_LINEAR_NDIM = {"linear": 1, "bilinear": 2, "trilinear": 3}
_REDUCED = (torch.float16, torch.bfloat16)


def _everywhere(exc: BaseException) -> BaseException:
    """An argument error decided from shared metadata: every rank raises it (nothing to post)."""
    return failure.everywhere(exc)


# ----------------------------------------------------------------------------------------------
# F.pad


def _pad_ref(input, pad, mode="constant", value=None):
    """Signature of F.pad."""


def _check_pad_args(x: Tensor, pad: list[int], mode: str, value) -> None:
    """The argument errors F.pad raises, raised alike on every rank (whatever its shard holds)."""
    if mode not in _PAD_MODES:
        raise _everywhere(NotImplementedError(f"Unrecognised padding mode {mode}"))
    if len(pad) % 2:
        raise _everywhere(ValueError("Padding length must be divisible by 2"))
    if len(pad) // 2 > x.dim():
        raise _everywhere(ValueError("Padding length should be less than or equal to two times the input dimension "
                                     f"but got padding length {len(pad)} and input of dimension {x.dim()}"))
    if mode != "constant":
        if value is not None and value != 0:
            raise _everywhere(ValueError(f'Padding mode "{mode}" doesn\'t take in value argument'))
        if (len(pad) // 2, x.dim()) not in _NON_CONSTANT_SHAPES:
            raise _everywhere(NotImplementedError(
                f"Only 2D, 3D, 4D, 5D padding with non-constant padding are supported for now (mode {mode}, "
                f"padding length {len(pad)}, input of dimension {x.dim()})"))


def _pad_local(t: Tensor, pad: list[int], mode: str, value) -> Tensor:
    """F.pad of the local tensor along unsharded dims (pad 0 along the sharded ones)."""
    if mode == "constant":
        return constant_pad(t, pad, 0.0 if value is None else value)
    if t.numel() == 0:  # reflect/replicate refuse an empty dim; the result is empty anyway
        return constant_pad(t, pad)
    return F.pad(t, pad, mode=mode)


def pad_ranges(shard: Shard, left: int, out_len: int) -> list[tuple[int, int, int, int]]:
    """Every rank's outputs of a pad along a sharded dim: ``(lo, a, b, hi)``, rank r owning the
    global outputs ``[lo, hi)``, of which ``[lo, a)`` lie before the tensor (left pad, first rank
    only), ``[a, b)`` are its own positions ``p = j - left`` and ``[b, hi)`` lie after the tensor
    (right pad, last rank only)."""
    ranges, last = [], shard.world - 1
    for q, (s, n) in enumerate(zip(shard.starts, shard.sizes)):
        lo = 0 if q == 0 else min(max(s + left, 0), out_len)
        hi = out_len if q == last else min(max(s + n + left, 0), out_len)
        a = min(hi, max(lo, s + left))
        b = min(hi, max(a, s + n + left))
        ranges.append((lo, a, b, hi))
    return ranges


def _pad_sharded(t: Tensor, d: int, shard: Shard, left: int, right: int, mode: str, value) -> tuple[Tensor, Shard]:
    """Pad (or crop) local ``t`` along sharded dim ``d``; the new local tensor and shard."""
    try:
        src = pad_sources(shard.total, left, right, mode)
    except ValueError as exc:
        raise _everywhere(ValueError(f"F.pad along sharded dim {d} (global length {shard.total}): {exc}")) from None
    ranges = pad_ranges(shard, left, len(src))
    lo, a, b, hi = ranges[shard.rank]
    offset = a - left - shard.start if b > a else 0
    if not torch.equal(src[a:b], torch.arange(a - left, b - left)):  # the interior is the identity in every mode
        raise RuntimeError(f"internal error: F.pad plan of mode {mode} is not the identity inside the tensor")
    middle = t.narrow(d, offset, b - a)
    if mode == "constant":
        fill = 0.0 if value is None else value
        before, after = edge_fill(t, d, a - lo, fill), edge_fill(t, d, hi - b, fill)
    else:
        needs = [torch.cat([src[q_lo:q_a], src[q_b:q_hi]]) for q_lo, q_a, q_b, q_hi in ranges]
        if any(len(n) for n in needs):
            edges = fetch_positions(t, d, needs, shard.sizes, shard.group, shard.rank)
            before, after = edges.narrow(d, 0, a - lo), edges.narrow(d, a - lo, hi - b)
        else:
            before, after = edge_fill(t, d, 0, 0.0), edge_fill(t, d, 0, 0.0)
    out = torch.cat([before, middle, after], d)
    return out, shard.with_sizes([q_hi - q_lo for q_lo, _, _, q_hi in ranges], lead=shard.lead + max(left, 0),
                                 trail=shard.trail + max(right, 0))


@rule(F.pad)
def _pad(op: Op):
    a = bind(op, _pad_ref)
    x, mode, value = a["input"], a["mode"], a["value"]
    pad = [int(p) for p in a["pad"]]
    _check_pad_args(x, pad, mode, value)
    dims = x.spec.sharded
    local_pad, padded = list(pad), {}
    for i in range(len(pad) // 2):
        d = x.dim() - 1 - i
        if d in dims:
            if pad[2 * i] or pad[2 * i + 1]:
                padded[d] = (pad[2 * i], pad[2 * i + 1])
            local_pad[2 * i] = local_pad[2 * i + 1] = 0
    t = x.as_subclass(Tensor)
    if not padded:
        out = on_piece(lambda piece: _pad_local(piece, pad, mode, value), t, dims)
        return ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims))
    if any(local_pad):
        t = _pad_local(t, local_pad, mode, value)
    new = dict(dims)
    for d, (left, right) in padded.items():
        t, new[d] = _pad_sharded(t, d, dims[d], left, right, mode, value)
    return ShardedTensor.wrap(t, x.spec.remap(t.dim(), new))


# ----------------------------------------------------------------------------------------------
# F.interpolate


def _interpolate_ref(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                     recompute_scale_factor=None, antialias=False):
    """Signature of F.interpolate."""


def _per_dim(value, n: int, what: str, x: Tensor) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise _everywhere(ValueError(
                f"Input and {what} must have the same number of spatial dimensions, but got input with spatial "
                f"dimensions of {list(x.shape[2:])} and {what} {list(value)}"))
        return list(value)
    return [value] * n


def _aten_interpolate(t: Tensor, mode: str, align_corners: bool, out_sizes: list[int], scales: list) -> Tensor:
    """ATen's upsample kernel of ``mode`` with explicit output sizes and per-dim kernel scales."""
    n = t.dim() - 2
    if t.numel() == 0:  # ATen refuses empty dims; the result is empty: a connected tensor of its shape
        pad = []
        for i in reversed(range(n)):
            pad += [0, out_sizes[i] - t.shape[2 + i]]
        return constant_pad(t, pad)
    names = {1: ("scales",), 2: ("scales_h", "scales_w"), 3: ("scales_d", "scales_h", "scales_w")}[n]
    kwargs = dict(zip(names, scales))
    nn = torch._C._nn
    if mode == "nearest":
        return getattr(nn, f"upsample_nearest{n}d")(t, output_size=out_sizes, **kwargs)
    if mode == "nearest-exact":
        return getattr(nn, f"_upsample_nearest_exact{n}d")(t, output_size=out_sizes, **kwargs)
    fn = {1: nn.upsample_linear1d, 2: nn.upsample_bilinear2d, 3: nn.upsample_trilinear3d}[n]
    return fn(t, output_size=out_sizes, align_corners=align_corners, **kwargs)


def _weights(w1: Tensor, d: int, ndim: int, compute: torch.dtype, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(w0, w1) as ATen stores them (in ``dtype``), in the compute dtype, shaped to broadcast along ``d``."""
    w0 = 1.0 - w1
    if dtype in _REDUCED:
        w0 = w0.float().to(dtype)
    shape = [-1] + [1] * (ndim - d - 1)
    return (w0.to(compute).to(device).view(shape), w1.to(compute).to(device).view(shape))


def _blend(src: Tensor, d: int, i0: Tensor, i1: Tensor, w1: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``src[i0] * w0 + src[i1] * w1`` along ``d`` (indices into src); ``w1`` None: nearest (a copy)."""
    device = src.device
    a = src.index_select(d, i0.to(device))
    if w1 is None:
        return a
    b = src.index_select(d, i1.to(device))
    w0t, w1t = _weights(w1, d, src.dim(), src.dtype, dtype, device)
    return torch.addcmul(b * w1t, a, w0t)


def interpolate_ranges(in_len: int, out_len: int, shard: Shard) -> list[tuple[int, int]]:
    """Every rank's outputs ``[lo, hi)`` along a sharded dim of global length ``in_len`` resampled
    to ``out_len``: output ``o`` belongs to the rank holding position ``floor(o * in_len / out_len)``
    (its place in the input, whatever the mode reads). For an integer factor ``s`` rank r owns
    ``[a_r s, (a_r + L_r) s)``, the split a strided layer's input had before it (U-Net skips line
    up); a rank may own no output (an empty shard; a short shard when downsampling)."""
    bounds = [-(-b * out_len // in_len) for b in (*shard.starts, shard.total)]  # ceil(b * out / in)
    return list(pairwise(bounds))


def _interpolate_sharded(t: Tensor, d: int, shard: Shard, plan, linear: bool,
                         dtype: torch.dtype) -> tuple[Tensor, Shard]:
    """Resample local ``t`` along sharded dim ``d`` by the global ``plan`` (i0, i1, w1)."""
    i0, i1, w1 = plan
    ranges = interpolate_ranges(shard.total, len(i0), shard)
    needs = []
    for lo, hi in ranges:
        read = torch.cat([i0[lo:hi], i1[lo:hi]]) if linear else i0[lo:hi]
        needs.append(torch.unique(read, sorted=True))
    lo, hi = ranges[shard.rank]
    start, end = shard.start, shard.start + shard.local
    moves = any(len(n) and (int(n[0]) < s or int(n[-1]) >= s + size)
                for n, s, size in zip(needs, shard.starts, shard.sizes))
    if moves:  # decided from the spec: every rank joins the exchange
        src = fetch_positions(t, d, needs, shard.sizes, shard.group, shard.rank)
        mine = needs[shard.rank]
        j0, j1 = torch.searchsorted(mine, i0[lo:hi]), torch.searchsorted(mine, i1[lo:hi])
    else:
        src = t
        j0, j1 = i0[lo:hi] - start, i1[lo:hi] - start
        if len(j0) and (int(i0[lo:hi].max()) >= end or int(i1[lo:hi].max()) >= end):
            raise RuntimeError("internal error: interpolate reads a position outside the shard")
    out = _blend(src, d, j0, j1, w1[lo:hi] if linear else None, dtype)
    return out, shard.with_sizes([h - l for l, h in ranges])


@rule(F.interpolate)
def _interpolate(op: Op):
    a = bind(op, _interpolate_ref)
    x, mode = a["input"], a["mode"]
    dims = x.spec.sharded
    n = x.dim() - 2
    spatial = sorted(d for d in dims if d >= 2)
    if not spatial:  # batch/channel sharded or replicated: the op acts within each rank's part
        args = {k: v for k, v in a.items() if k != "input"}
        out = on_piece(lambda t: op.run(t, **args), x.as_subclass(Tensor), dims)
        return ShardedTensor.wrap(out, x.spec.remap(out.dim(), dims))
    d0 = spatial[0]
    if mode not in _NEAREST and mode not in _LINEAR_NDIM:
        raise op.refuse(f"mode={mode!r} along a sharded dim (its window reaches further than a blend of two "
                        "positions)", d0, "use nearest, nearest-exact or (bi/tri)linear, or interpolate along "
                        "unsharded dims only")
    if a["antialias"]:
        raise op.refuse("antialias=True along a sharded dim", d0, "use antialias=False")
    dtype = x.dtype
    if dtype not in (torch.float64, torch.float32, *_REDUCED):
        raise op.refuse(f"dtype {dtype} along a sharded dim (index plans are for floating dtypes)", d0,
                        "interpolate a floating tensor")
    align_corners = a["align_corners"]
    if mode in _NEAREST:
        if align_corners is not None:
            raise _everywhere(ValueError("align_corners option can only be set with the interpolating modes: "
                                         "linear | bilinear | bicubic | trilinear"))
    else:
        align_corners = bool(align_corners)
        if _LINEAR_NDIM[mode] != n:
            raise _everywhere(NotImplementedError(
                f"Got {x.dim()}D input, but {mode} mode needs {_LINEAR_NDIM[mode] + 2}D input"))
    if a["size"] is not None and a["scale_factor"] is not None:
        raise _everywhere(ValueError("only one of size or scale_factor should be defined"))
    sizes = _per_dim(a["size"], n, "output size", x)
    scales = _per_dim(a["scale_factor"], n, "scale_factor", x)
    linear = mode not in _NEAREST
    in_lens = [dims[2 + i].total if 2 + i in dims else x.shape[2 + i] for i in range(n)]
    out_lens, kernel_scales = [], []
    for i in range(n):
        try:
            out_len, scale = interpolate_output_size(in_lens[i], sizes[i], scales[i], a["recompute_scale_factor"])
        except ValueError as exc:
            raise _everywhere(ValueError(f"F.interpolate: {exc}")) from None
        out_lens.append(out_len)
        kernel_scales.append(scale)

    t = x.as_subclass(Tensor)
    separable = linear and dtype in _REDUCED  # blend every dim in float32, round once (as ATen's opmath)
    if separable:
        t = t.float()
    new, run = dict(dims), []

    def flush(t: Tensor) -> Tensor:
        if not run:
            return t
        out_sizes = [out_lens[i] if i in run else t.shape[2 + i] for i in range(n)]
        kscales = [kernel_scales[i] if i in run else None for i in range(n)]
        run.clear()
        return _aten_interpolate(t, mode, align_corners, out_sizes, kscales)

    for i in reversed(range(n)):  # the last spatial dim first: ATen's order of blending
        d = 2 + i
        if d not in dims and not separable:
            run.append(i)
            continue
        t = flush(t)
        plan = interpolate_sources(in_lens[i], out_lens[i], mode, align_corners, kernel_scales[i], dtype=dtype,
                                   spatial_dims=n)
        if d in dims:
            t, new[d] = _interpolate_sharded(t, d, dims[d], plan, linear, dtype)
        else:
            t = _blend(t, d, plan[0], plan[1], plan[2] if linear else None, dtype)
    t = flush(t)
    if separable:
        t = t.to(dtype)
    return ShardedTensor.wrap(t, x.spec.remap(t.dim(), new))
