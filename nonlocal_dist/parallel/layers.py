"""Sharded equivalents of a video network's layers, exact along the shard axis.

Each class subclasses the PyTorch layer it stands for and replaces only ``forward``: a model is
converted by swapping the class of its modules in place (``nonlocal_dist.parallelize``), so
parameters, buffers, state-dict keys and hooks stay the same objects. The input is this rank's
shard along dim ``shard_dim`` of the layer's (B, C, *spatial) input; the output is this rank's shard
of the single-device output (``window.py`` says which outputs a rank owns).

Gradients follow the project's convention: a parameter's gradient on each rank is its part, and the
sum over the group is the single-device gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nonlocal_dist.parallel.agreement import ForwardAgreement
from nonlocal_dist.parallel.collectives import all_reduce
from nonlocal_dist.parallel.halo import shard_lengths
from nonlocal_dist.parallel.norm import group_batch_norm
from nonlocal_dist.parallel.window import Window, sliding_window

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class _Sharded:
    """What every sharded layer carries: the group, the shard dim and the spatial rank of its input."""

    sp_group: object
    shard_dim: int
    spatial_dims: int
    sp_agreement: ForwardAgreement | None = None  # set by parallelize: lengths agreed once per model forward

    def _shard_lengths(self, x: Tensor) -> list[int]:
        """Every rank's length along the shard dim; raises on every rank for a bad or mismatched input."""
        what = type(self).__name__

        def run() -> list[int]:
            return shard_lengths(x, self.shard_dim, self.sp_group, what, self.spatial_dims + 2)

        def check(sizes: list[int]) -> None:
            if x.dim() != self.spatial_dims + 2 or x.shape[self.shard_dim] != sizes[dist.get_rank(self.sp_group)]:
                raise RuntimeError(
                    f"{what} got shape {tuple(x.shape)} where an earlier forward with the same model inputs gave it "
                    f"{sizes[dist.get_rank(self.sp_group)]} positions along dim {self.shard_dim}: the model's forward "
                    "depends on more than its inputs' shapes, so the ranks cannot reuse their agreed shard lengths. "
                    "Make the forward a function of the input shapes, or call the layers outside parallelize's model."
                )

        return run() if self.sp_agreement is None else self.sp_agreement.agree(self, run, check)

    def _others_zeroed(self, values: tuple) -> tuple:
        """``values`` per spatial dim with the shard dim's entry set to 0 (its padding is done by hand)."""
        return tuple(0 if i == self.shard_dim - 2 else v for i, v in enumerate(values))


class _ShardedConv(_Sharded):
    """Convolution with its input's halos from the neighbouring ranks (zero padding at the global edges)."""

    window: Window

    def forward(self, x: Tensor) -> Tensor:
        sizes = self._shard_lengths(x)
        return sliding_window(self._conv, x, self.shard_dim, self.window, sizes, self.sp_group, type(self).__name__, 0.0)[0]

    def _conv(self, ext: Tensor) -> Tensor:
        conv = _CONV[self.spatial_dims]
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            padding = self._others_zeroed(self.padding)
            return conv(ext, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        # 'same'/'valid' or a non-zero padding mode: pad the other dims by hand (shard dim's padding is 0).
        pad = list(self._reversed_padding_repeated_twice)
        index = 2 * (self.spatial_dims - 1 - (self.shard_dim - 2))
        pad[index : index + 2] = [0, 0]
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return conv(F.pad(ext, pad, mode=mode), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ShardedConv1d(_ShardedConv, nn.Conv1d):
    """``nn.Conv1d`` over a (B, C, L_r) shard of the position axis."""


class ShardedConv2d(_ShardedConv, nn.Conv2d):
    """``nn.Conv2d`` over a (B, C, H, W) tensor sharded along H or W."""


class ShardedConv3d(_ShardedConv, nn.Conv3d):
    """``nn.Conv3d`` over a (B, C, T, H, W) tensor sharded along T, H or W."""


class _ShardedMaxPool(_Sharded):
    """Max pooling whose windows may cross shards (-inf beyond the global edges, as PyTorch pads)."""

    window: Window

    def forward(self, x: Tensor) -> Tensor:
        value = float("-inf")
        n = self.spatial_dims

        def pool(t: Tensor) -> Tensor:
            return _MAX_POOL[n](t, self.kernel_size, self.stride, self._others_zeroed(_per_dim(self.padding, n)),
                                self.dilation, ceil_mode=False)

        sizes = self._shard_lengths(x)
        return sliding_window(pool, x, self.shard_dim, self.window, sizes, self.sp_group, type(self).__name__, value)[0]


class ShardedMaxPool1d(_ShardedMaxPool, nn.MaxPool1d):
    """``nn.MaxPool1d`` over a (B, C, L_r) shard."""


class ShardedMaxPool2d(_ShardedMaxPool, nn.MaxPool2d):
    """``nn.MaxPool2d`` over a (B, C, H, W) tensor sharded along H or W."""


class ShardedMaxPool3d(_ShardedMaxPool, nn.MaxPool3d):
    """``nn.MaxPool3d`` over a (B, C, T, H, W) tensor sharded along T, H or W."""


class _ShardedAvgPool(_Sharded):
    """Average pooling whose windows may cross shards.

    The shard axis is zero-padded by hand, so the local pool divides by the whole kernel along it:
    right for ``count_include_pad=True``; for ``False`` each output is rescaled by kernel / (the
    number of its taps inside the global axis). ``divisor_override`` needs neither.
    """

    window: Window

    def forward(self, x: Tensor) -> Tensor:
        dim, n = self.shard_dim, self.spatial_dims

        divisor = getattr(self, "divisor_override", None)  # AvgPool1d has none
        extra = () if n == 1 else (divisor,)

        def pool(t: Tensor) -> Tensor:
            return _AVG_POOL[n](t, self.kernel_size, self.stride, self._others_zeroed(_per_dim(self.padding, n)),
                                False, self.count_include_pad, *extra)

        sizes = self._shard_lengths(x)
        out, (left, right, length) = sliding_window(pool, x, dim, self.window, sizes, self.sp_group, type(self).__name__, 0.0)
        if self.count_include_pad or divisor or out.shape[dim] == 0 or left + right == 0:
            return out
        inside = x.new_ones(1, 1, length)
        inside[..., :left] = 0
        inside[..., length - right :] = 0
        fraction = F.avg_pool1d(inside, self.window.kernel, self.window.stride).view(-1)  # taps inside / kernel
        shape = [1] * out.dim()
        shape[dim] = -1
        return out / fraction.view(shape)


class ShardedAvgPool1d(_ShardedAvgPool, nn.AvgPool1d):
    """``nn.AvgPool1d`` over a (B, C, L_r) shard."""


class ShardedAvgPool2d(_ShardedAvgPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` over a (B, C, H, W) tensor sharded along H or W."""


class ShardedAvgPool3d(_ShardedAvgPool, nn.AvgPool3d):
    """``nn.AvgPool3d`` over a (B, C, T, H, W) tensor sharded along T, H or W."""


def _per_dim(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class _ShardedBatchNorm(_Sharded):
    """BatchNorm whose batch statistics span every rank's positions; takes any (B, C, *spatial) input,
    as BatchNorm1d subclasses used on video do, in any precision (``group_batch_norm``: keeps what
    torch's BatchNorm keeps for backward)."""

    def forward(self, x: Tensor) -> Tensor:
        # No metadata all-gather here: the statistics' all-gather has 2C + 1 entries on every rank
        # (one model), so only a wrong channel count could mismatch, and that fails every rank.
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects (B, {self.num_features}, ...), "
                             f"got shape {tuple(x.shape)}")
        return group_batch_norm(x, self, self.sp_group)


class ShardedBatchNorm1d(_ShardedBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over (B, C, L_r) shards; statistics over the group."""


class ShardedBatchNorm2d(_ShardedBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over (B, C, H, W) shards; statistics over the group."""


class ShardedBatchNorm3d(_ShardedBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` over (B, C, T, H, W) shards; statistics over the group."""


class _ShardedGlobalAvgPool(_Sharded):
    """Adaptive average pooling to size 1 along the shard axis: the mean over every rank's positions.

    Sums along the shard axis, one differentiable all-reduce, divided by the total length; the other
    axes pool to their own output sizes. The output (B, C, ...) is the same on every rank (replicated):
    what follows it (a classification head) runs whole on each rank.
    """

    def forward(self, x: Tensor) -> Tensor:
        n, dim = self.spatial_dims, self.shard_dim
        total = sum(self._shard_lengths(x))
        sizes = _per_dim(self.output_size, n)
        sizes = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(sizes))
        summed = _ADAPTIVE_AVG_POOL[n](x.sum(dim, keepdim=True), sizes)
        return all_reduce(summed, self.sp_group) / total


class ShardedAdaptiveAvgPool1d(_ShardedGlobalAvgPool, nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d(1)`` over (B, C, L_r) shards."""


class ShardedAdaptiveAvgPool2d(_ShardedGlobalAvgPool, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with size 1 along the shard axis, over (B, C, H, W) shards."""


class ShardedAdaptiveAvgPool3d(_ShardedGlobalAvgPool, nn.AdaptiveAvgPool3d):
    """``nn.AdaptiveAvgPool3d`` with size 1 along the shard axis, over (B, C, T, H, W) shards."""


class ReplicatedDropout(nn.Dropout):
    """``nn.Dropout`` on features that every rank holds whole (after the global pool): the same mask
    on every rank of the group, drawn from a generator per device seeded alike on all of them
    (``parallelize`` broadcasts ``seed``), so the replicated head gives the same logits everywhere,
    as one device would. (Plain dropout draws from each rank's own RNG: the ranks' logits and
    gradients would belong to different masks.)"""

    seed: int

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        generators = self.__dict__.setdefault("_generators", {})
        if x.device not in generators:
            generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=generators[x.device])
        scaled = keep.div_(1.0 - self.p) if self.p < 1.0 else keep
        return x.mul_(scaled) if self.inplace else x * scaled
