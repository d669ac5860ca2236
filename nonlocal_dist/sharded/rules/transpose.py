"""Transposed convolutions over sharded spatial dims, exact by an overlap-add (``halo_reduce``).

A transposed convolution is the adjoint of a convolution, and so is its sharding: where a
convolution fetches a halo of inputs from the neighbouring ranks (``halo_exchange``), a transposed
convolution *sends* the part of its local result that falls on the neighbours' outputs and adds it
there (``halo_reduce``, the exchange's adjoint). Along a sharded dim (kernel k, stride s, dilation
d, padding p, output_padding q, N = Σ L_r inputs), input i and tap j write the unpadded output
``u = i*s + j*d``; the global output is ``o = u - p`` for ``o`` in ``[0, Out)``, with
``Out = (N-1)*s - 2p + d*(k-1) + q + 1`` (PyTorch's definition: p cropped at both ends, then q more
positions at the end, which receive whatever contributions fall there, and the bias).

Ownership rule: rank r owns the global outputs ``[a_r*s, a_{r+1}*s)`` (clipped to ``[0, Out)``), the
last rank everything from ``a_{P-1}*s`` to the end, so a rank's outputs start at s times its inputs'
start (the mirror of a strided convolution's rule, ``sharded/sliding.py``): a kernel-2 stride-2
up-sampling gives shards of exactly ``s*L_r``, aligned with the encoder's skip connection. Every
rank's output length follows from the spec alone.

Rank r runs the transposed convolution on its shard with no padding and no output_padding along the
sharded dims and no bias; its result covers ``o`` in ``[a_r*s - p, (a_r+L_r-1)*s + d*(k-1) + 1 - p)``.
That is laid out as the halo-extended window of its own outputs (zeros where it computed nothing,
positions outside ``[0, Out)`` dropped: the padding crop) and ``halo_reduce`` adds every spilled
position on its owner, across several ranks when shards are shorter than the overlap. Then the
bias is added once per output. One all-to-all per sharded dim, none when nothing overlaps (kernel
``d*(k-1) + 1 <= s`` with p = 0, as in a U-Net's kernel-2 stride-2 up-sampling). An empty shard
still joins every all-to-all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.distributed.failure import everywhere
from nonlocal_dist.sharded.halo import constant_pad, halo_reduce
from nonlocal_dist.sharded.rules.common import bind, per_dim, spatial_dims
from nonlocal_dist.sharded.spec import Shard
from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


class _Axis:
    """The geometry of a transposed convolution along one sharded dim (the same on every rank)."""

    def __init__(self, shard: Shard, kernel: int, stride: int, dilation: int, padding: int, output_padding: int):
        self.shard, self.stride = shard, stride
        extent = dilation * (kernel - 1)
        n = shard.total
        self.total = (n - 1) * stride - 2 * padding + extent + output_padding + 1
        out = self.total
        # Rank r owns [bounds[r], bounds[r+1]).
        self.bounds = [min(a * stride, out) if r else 0 for r, a in enumerate(shard.starts)] + [out]
        self.sizes = [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]
        # Rank r's local result covers [first[r], first[r] + length[r]) of the output axis.
        self.first = [a * stride - padding for a in shard.starts]
        self.length = [(size - 1) * stride + extent + 1 if size else 0 for size in shard.sizes]
        before = after = 0
        for r, size in enumerate(shard.sizes):
            lo, hi = max(self.first[r], 0), min(self.first[r] + self.length[r], out)
            if size and hi > lo:
                before = max(before, self.bounds[r] - lo)
                after = max(after, hi - self.bounds[r + 1])
        self.before, self.after = before, after

    def window(self, r: int) -> tuple[int, int]:
        """The output positions [lo, hi) that rank r's extended tensor holds (as ``halo_plan`` has them)."""
        return max(0, self.bounds[r] - self.before), min(self.total, self.bounds[r + 1] + self.after)


def _place(t: Tensor, dim: int, axis: _Axis) -> Tensor:
    """This rank's local result along ``dim`` -> the halo-extended window of its outputs: the part of
    the result inside the window, zeros elsewhere (what falls outside ``[0, Out)`` is cropped)."""
    r = axis.shard.rank
    lo, hi = axis.window(r)
    first, length = axis.first[r], t.shape[dim]
    i_lo = min(max(first, lo), hi)
    i_hi = max(i_lo, min(first + length, hi))
    offset = min(max(i_lo - first, 0), length)
    piece = t.narrow(dim, offset, min(i_hi - i_lo, length - offset))
    pad = [0, 0] * (t.dim() - 1 - dim) + [i_lo - lo, hi - i_hi]
    return constant_pad(piece, pad) if any(pad) else piece


def _ref(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Signature of F.conv_transpose1d/2d/3d."""


def _transpose_rule(n: int, conv):
    def run(op: Op):
        a = bind(op, _ref)
        x, weight, bias = a["input"], a["weight"], a["bias"]
        if not isinstance(x, ShardedTensor) or any(isinstance(t, ShardedTensor) for t in (weight, bias)):
            raise op.refuse("a sharded weight", fix="keep parameters plain (replicated)")
        spatial = spatial_dims(x, n, op)
        kernel = list(weight.shape[2:])
        stride, dilation = per_dim(a["stride"], n), per_dim(a["dilation"], n)
        padding, output_padding = per_dim(a["padding"], n), per_dim(a["output_padding"], n)
        dims = x.spec.sharded
        axes = {}
        for d, i in spatial.items():
            if output_padding[i] >= max(stride[i], dilation[i]) or output_padding[i] < 0:
                raise everywhere(RuntimeError(
                    f"{op.name}: output padding must be smaller than either stride or dilation, but got "
                    f"output_padding {output_padding[i]}, stride {stride[i]}, dilation {dilation[i]} along dim {d}"
                ))
            axes[d] = _Axis(dims[d], kernel[i], stride[i], dilation[i], padding[i], output_padding[i])
            if axes[d].total <= 0:
                raise everywhere(RuntimeError(
                    f"{op.name}: calculated output size {axes[d].total} along dim {d} (input {dims[d].total}, "
                    f"kernel {kernel[i]}, stride {stride[i]}, dilation {dilation[i]}, padding {padding[i]}, "
                    f"output_padding {output_padding[i]}) is too small"
                ))
        local_padding = [0 if (x.dim() - n + i) in spatial else p for i, p in enumerate(padding)]
        local_output_padding = [0 if (x.dim() - n + i) in spatial else p for i, p in enumerate(output_padding)]

        t = x.as_subclass(Tensor)
        # An empty shard runs on one zero position (so the weight stays in its graph) and keeps none.
        empty = [d for d in spatial if t.shape[d] == 0]
        for d in empty:
            t = constant_pad(t, [0, 0] * (t.dim() - 1 - d) + [0, 1])
        out = conv(t, weight, None, stride, local_padding, local_output_padding, a["groups"], dilation)
        for d in empty:
            out = out.narrow(d, 0, 0)
        for d, axis in axes.items():
            if axis.before or axis.after:  # the same on every rank: all reduce, or none
                shard = axis.shard
                out = halo_reduce(_place(out, d, axis), d, axis.before, axis.after, axis.sizes, shard.group)
            else:
                out = _place(out, d, axis)
        if bias is not None:
            out = out + bias.reshape(-1, *[1] * n)
        new = {d: (s.with_sizes(axes[d].sizes) if d in axes else s) for d, s in dims.items()}
        return ShardedTensor.wrap(out, x.spec.remap(out.dim(), new))

    return run


for _n, _conv in ((1, F.conv_transpose1d), (2, F.conv_transpose2d), (3, F.conv_transpose3d)):
    rule(_conv, getattr(torch, _conv.__name__))(_transpose_rule(_n, _conv))
