"""Sliding windows over sharded dims: convolutions and max/avg pooling, exact by halo exchange.

For each sharded spatial dim the window's halo comes from the neighbouring ranks (one all-to-all
per dim; a second dim's exchange carries the first one's halos, so the corners of a 2-D mesh are
right), the layer's padding stands beyond the global edges, and the op runs once on the extended
shard with no padding along those dims. Rank r owns the outputs whose window starts in its shard
(``sharded/sliding.py``); each rank's output length is computed from the spec, so the result's
spec is known everywhere without a collective.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.sharded.fetch import reshard
from nonlocal_dist.sharded.halo import constant_pad, halo_exchange
from nonlocal_dist.sharded.rules.common import (
    bind,
    log_once,
    per_dim,
    reshard_bytes,
    spatial_dims,
)
from nonlocal_dist.sharded.sliding import (
    Window,
    aligned_sizes,
    apply_windows,
    halo_lengths,
    output_lengths,
    sliding_window,
    span,
    window_offset,
)
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule, user_frame


def _aligned(op: Op, x: Tensor, d: int, window: Window, shard: Shard) -> tuple[Tensor, Shard, int]:
    """x's shard along ``d`` with boundaries that share one window offset (``sliding.window_offset``),
    resharded to the nearest such split where they do not (logged once per call site with its
    bytes), its shard and the offset. Decided from the spec: every rank reshards alike."""
    why = window.refusal()
    if why is not None:
        raise op.refuse(why, d)
    offset = window_offset(window, shard.sizes) if shard.world > 1 else 0
    if offset is not None:
        return x, shard, offset
    sizes = aligned_sizes(window, shard.sizes)
    moved = reshard_bytes(x, d, shard.sizes, sizes)
    log_once(user_frame(), f"{op.name} has stride {window.stride} along sharded dim {d}, but the shard lengths "
                           f"{list(shard.sizes)} put its windows off one grid: resharded to {list(sizes)}, about "
                           f"{moved} bytes moved per call")
    x = reshard(x, d, shard.sizes, sizes, shard.group, shard.rank)
    shard = shard.with_sizes(sizes)
    return x, shard, window_offset(window, sizes)


def _alone(x: ShardedTensor) -> bool:
    """Whether every sharded dim of x is split over a group of one (the rank holds the whole tensor)."""
    return all(s.world == 1 for _, s in x.spec.dims)


def _as_alone(x: ShardedTensor, out: Tensor) -> ShardedTensor:
    """The layer's own result on a group of one, each sharded dim of x kept at the output's length.
    (The layer ran on x itself, not on an alias: torch functions are off inside a rule, and a builtin
    kernel sees only the local tensor; an alias would add a node to the backward graph per op.)"""
    if out.dim() == x.dim() and all(out.shape[d] == s.sizes[0] and not (s.lead or s.trail) for d, s in x.spec.dims):
        return ShardedTensor.wrap(out, x.spec)  # the lengths kept (a stride-1 'same' layer): x's spec as it is
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), {d: s.with_sizes((out.shape[d],)) for d, s in x.spec.dims}))


def windowed(op: Op, x: ShardedTensor, windows: dict[int, Window], fn, value: float, native=None) -> ShardedTensor:
    """``fn`` (the op with zero padding along the windows' dims) over the halo-extended shard; where
    every windowed dim is sharded over a group of one (the rank holds the whole axis), ``native``
    (the op with its own padding) on the shard, with no exchange."""
    dims = x.spec.sharded
    local = x.as_subclass(Tensor)
    windows = {d: dataclasses.replace(w, lead=dims[d].lead, trail=dims[d].trail) for d, w in windows.items()}
    offsets = {}
    for d, w in windows.items():
        local, dims[d], offsets[d] = _aligned(op, local, d, w, dims[d])
    if native is not None and all(dims[d].world == 1 for d in windows):
        out = native(local)
    elif len(windows) == 1:
        (d, w), = windows.items()
        out = sliding_window(fn, local, d, w, list(dims[d].sizes), dims[d].group, value, offsets[d])
    else:
        ext = local
        for d, w in windows.items():
            shard = dims[d]
            left, right, _ = span(w, shard.sizes, shard.rank, offsets[d])
            ext = halo_exchange(ext, d, *halo_lengths(w, offsets[d]), list(shard.sizes), shard.group, (left, right),
                                value)
        out = apply_windows(fn, ext, windows, value)
    new = {d: (s.with_sizes(output_lengths(windows[d], s.sizes, offsets[d])) if d in windows else s)
           for d, s in dims.items()}
    return ShardedTensor.wrap(out, x.spec.remap(out.dim(), new))


def _conv_padding(padding, kernel, dilation, n) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in per_dim(padding, n)]


def _conv_ref(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Signature of F.conv1d/2d/3d."""


def _conv_rule(n: int, conv):
    def run(op: Op):
        a = bind(op, _conv_ref)
        x, weight = a["input"], a["weight"]
        if not isinstance(x, ShardedTensor) or any(isinstance(t, ShardedTensor) for t in (weight, a["bias"])):
            raise op.refuse("a sharded weight", fix="keep parameters plain (replicated)")
        spatial = spatial_dims(x, n, op)
        bias = a["bias"]
        if _alone(x):
            return _as_alone(x, conv(x, weight, bias, a["stride"], a["padding"], a["dilation"],
                                     a["groups"]))
        kernel = list(weight.shape[2:])
        stride, dilation = per_dim(a["stride"], n), per_dim(a["dilation"], n)
        pads = _conv_padding(a["padding"], kernel, dilation, n)
        windows = {d: Window(kernel[i], stride[i], dilation[i], *pads[i]) for d, i in spatial.items()}
        local_pads = [(0, 0) if i in spatial.values() else p for i, p in enumerate(pads)]
        if all(lo == hi for lo, hi in local_pads):
            padding = [lo for lo, _ in local_pads]

            def fn(t):
                return conv(t, weight, bias, stride, padding, dilation, a["groups"])
        else:
            flat = [p for lo_hi in reversed(local_pads) for p in lo_hi]

            def fn(t):
                return conv(constant_pad(t, flat), weight, bias, stride, 0, dilation, a["groups"])

        def native(t):
            return conv(t, weight, bias, stride, a["padding"], dilation, a["groups"])

        return windowed(op, x, windows, fn, 0.0, native)

    return run


for _n, _conv in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    rule(_conv)(_conv_rule(_n, _conv))


def _max_ref(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Signature of F.max_pool1d/2d/3d."""


def _avg_ref(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Signature of F.avg_pool1d/2d/3d."""


def _pool_windows(op: Op, x: ShardedTensor, a: dict, n: int, dilation) -> dict[int, Window]:
    spatial = spatial_dims(x, n, op)
    kernel = per_dim(a["kernel_size"], n)
    stride = per_dim(a["stride"] if a["stride"] not in (None, [], ()) else a["kernel_size"], n)
    padding = per_dim(a["padding"], n)
    for d in spatial:
        if a["ceil_mode"]:
            raise op.refuse("ceil_mode=True along a sharded dim (its extra window at the end)", d, "use ceil_mode=False")
    return {d: Window(kernel[i], stride[i], dilation[i], padding[i], padding[i]) for d, i in spatial.items()}


def _max_rule(n: int, pool):
    def run(op: Op):
        a = bind(op, _max_ref)
        x = a["input"]
        if a["return_indices"]:
            raise op.refuse("return_indices=True (indices would be local to each shard)")
        dilation = per_dim(a["dilation"], n)
        windows = _pool_windows(op, x, a, n, dilation)
        kernel = per_dim(a["kernel_size"], n)
        stride = per_dim(a["stride"] if a["stride"] not in (None, [], ()) else a["kernel_size"], n)
        if _alone(x):
            return _as_alone(x, pool(x, kernel, stride, a["padding"], dilation,
                                     ceil_mode=a["ceil_mode"]))
        padding = [0 if (x.dim() - n + i) in windows else p for i, p in enumerate(per_dim(a["padding"], n))]

        def fn(t):
            return pool(t, kernel, stride, padding, dilation, ceil_mode=a["ceil_mode"])

        def native(t):
            return pool(t, kernel, stride, a["padding"], dilation, ceil_mode=a["ceil_mode"])

        return windowed(op, x, windows, fn, float("-inf"), native)

    return run


def _avg_rule(n: int, pool):
    def run(op: Op):
        a = bind(op, _avg_ref)
        x = a["input"]
        windows = _pool_windows(op, x, a, n, [1] * n)
        kernel = per_dim(a["kernel_size"], n)
        stride = per_dim(a["stride"] if a["stride"] not in (None, [], ()) else a["kernel_size"], n)
        extra = () if n == 1 else (a["divisor_override"],)
        if _alone(x):
            return _as_alone(x, pool(x, kernel, stride, a["padding"], a["ceil_mode"],
                                     a["count_include_pad"], *extra))
        padding = [0 if (x.dim() - n + i) in windows else p for i, p in enumerate(per_dim(a["padding"], n))]
        if not a["count_include_pad"] and a["divisor_override"] is None and any(
            w.pad_left or w.pad_right for w in windows.values()
        ):
            return _avg_excluding_pad(op, x, windows, kernel, stride, padding, pool, n)

        def fn(t):
            return pool(t, kernel, stride, padding, a["ceil_mode"], a["count_include_pad"], *extra)

        def native(t):
            return pool(t, kernel, stride, a["padding"], a["ceil_mode"], a["count_include_pad"], *extra)

        return windowed(op, x, windows, fn, 0.0, native)

    return run


def _avg_excluding_pad(op, x, windows, kernel, stride, padding, pool, n):
    """count_include_pad=False with padding along a sharded dim: the sum pooled with zero padding
    (``divisor_override=1`` in effect) divided by the count of taps inside the global tensor, the
    count pooled the same way from ones. Exact, and the same on every rank."""
    ones = ShardedTensor.wrap(torch.ones_like(x.as_subclass(Tensor)), x.spec)

    def fn(t):
        if n == 1:
            return pool(t, kernel, stride, padding, False, False) * math.prod(kernel)
        return pool(t, kernel, stride, padding, False, False, 1)

    total = windowed(op, x, windows, fn, 0.0)
    count = windowed(op, ones, windows, fn, 0.0)
    return ShardedTensor.wrap(total.as_subclass(Tensor) / count.as_subclass(Tensor), total.spec)


for _n, (_mp, _ap) in enumerate(((F.max_pool1d, F.avg_pool1d), (F.max_pool2d, F.avg_pool2d), (F.max_pool3d, F.avg_pool3d)), 1):
    rule(_mp)(_max_rule(_n, _mp))
    rule(_ap)(_avg_rule(_n, _ap))
for _n, _mp in ((1, torch.max_pool1d), (2, torch.max_pool2d), (3, torch.max_pool3d)):
    rule(_mp)(_max_rule(_n, _mp))
