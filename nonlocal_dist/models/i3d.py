"""A small I3D (inflated 3D ResNet) with non-local blocks, written for one device.

The paper's I3D ResNet scaled down: a stem convolution with a temporal kernel, a max pooling
with temporal and spatial stride, stages ``layer1``, ``layer2``, ... of bottleneck blocks whose
first (``"3x1x1"``) or middle (``"3x3x3"``) convolution is inflated in time in the blocks an
``inflate`` mask marks (the others stay 1x1x1 / 1x3x3 in time), global average pooling and a
linear head. Non-local blocks are added by ``insert_nonlocal`` after the residual blocks that
``nonlocal_stages`` marks. Nothing here knows about process groups: ``nonlocal_dist.parallelize``
shards it from outside.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from nonlocal_dist.models.insert import insert_nonlocal

__all__ = ["Bottleneck3d", "I3DNonLocal"]

INFLATE_STYLES = ("3x1x1", "3x3x3")


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(v, int) and v >= 1 for v in triple):
        raise ValueError(f"{name} must be a positive int or (t, h, w) of positive ints, got {value!r}")
    return triple


class Bottleneck3d(nn.Module):
    """(B, C_in, T, H, W) -> (B, C_out, T, H', W'): ``relu(bn3(conv3(bn2(conv2(bn1(conv1 x))))) + shortcut x)``.

    The middle width is ``out_channels // 4``; ``spatial_stride`` is applied by the middle conv and
    the shortcut. ``inflate``: the temporal kernel 3 goes to conv1 (``"3x1x1"``) or conv2
    (``"3x3x3"``), else every kernel is 1 in time.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_stride: int, inflate: bool, style: str) -> None:
        super().__init__()
        mid = max(out_channels // 4, 1)
        k1 = 3 if inflate and style == "3x1x1" else 1
        k2 = 3 if inflate and style == "3x3x3" else 1
        stride = (1, spatial_stride, spatial_stride)
        self.out_channels = out_channels
        self.conv1 = nn.Conv3d(in_channels, mid, (k1, 1, 1), padding=(k1 // 2, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, (k2, 3, 3), stride=stride, padding=(k2 // 2, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_channels != out_channels or spatial_stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class I3DNonLocal(nn.Module):
    """(B, C_in, T, H, W) clips -> (B, num_classes) logits.

    stem: ``Conv3d(stem_kernel, stem_stride)`` + BN + ReLU, then ``MaxPool3d(pool_kernel,
    pool_stride)`` (padding kernel // 2); stage i (``layer{i+1}``): ``depths[i]`` bottlenecks of
    ``widths[i]`` output channels, the first with spatial stride ``strides[i]``; ``inflate[i][j]``
    inflates block j of stage i in time (``inflate_style``). ``nonlocal_stages`` (a mask of the same
    shape, or ``()``: none, the ablation) places non-local blocks (``mode``, ``nonlocal_kwargs`` to
    ``insert_nonlocal``; its ``zero_init=False`` starts the blocks open, for training from scratch,
    where the default identity start leaves theta, phi and g without gradient until the blocks'
    output weight grows). The defaults are the paper's I3D pattern at a laptop's scale: inflation
    in every other block, non-local blocks after every other block of the middle stages.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 400,
        *,
        stem_channels: int = 16,
        stem_kernel: int | Sequence[int] = (3, 5, 5),
        stem_stride: int | Sequence[int] = (1, 2, 2),
        pool_kernel: int | Sequence[int] = (3, 3, 3),
        pool_stride: int | Sequence[int] = (2, 2, 2),
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (1, 2, 2),
        strides: Sequence[int] = (1, 2, 2),
        inflate: Sequence[Sequence[int]] = ((1,), (1, 0), (1, 0)),
        inflate_style: str = "3x1x1",
        nonlocal_stages: Sequence[Sequence[int]] = ((0,), (1, 0), (1, 0)),
        mode: str = "embedded_gaussian",
        nonlocal_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if inflate_style not in INFLATE_STYLES:
            raise ValueError(f"inflate_style must be one of {INFLATE_STYLES}, got {inflate_style!r}")
        if not len(widths) == len(depths) == len(strides) == len(inflate):
            raise ValueError(
                f"widths, depths, strides and inflate need one entry per stage; got lengths "
                f"{len(widths)}, {len(depths)}, {len(strides)}, {len(inflate)}"
            )
        if [len(m) for m in inflate] != list(depths):
            raise ValueError(f"inflate needs one 0/1 per block of each stage (depths {tuple(depths)}), got {inflate!r}")
        stem_kernel, pool_kernel = _triple(stem_kernel, "stem_kernel"), _triple(pool_kernel, "pool_kernel")
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem_channels, stem_kernel, stride=_triple(stem_stride, "stem_stride"),
                      padding=tuple(k // 2 for k in stem_kernel), bias=False),
            nn.BatchNorm3d(stem_channels),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.MaxPool3d(pool_kernel, _triple(pool_stride, "pool_stride"), tuple(k // 2 for k in pool_kernel))
        cin = stem_channels
        for index, (width, depth, stride, mask) in enumerate(zip(widths, depths, strides, inflate)):
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck3d(cin, width, stride if j == 0 else 1, bool(mask[j]), inflate_style))
                cin = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(cin, num_classes)
        if nonlocal_stages:  # an all-zero mask is checked against the stages and inserts nothing
            insert_nonlocal(self, nonlocal_stages, mode=mode, **(nonlocal_kwargs or {}))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.stem(x))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.head(self.avgpool(x).flatten(1))
