"""A zoo of small single-device video networks written in plain PyTorch.

Each network follows the coding style of a real project: much of the
computation happens in ``forward`` with functional calls (``F.pad``,
``F.avg_pool3d``, ``F.interpolate``, ``torch.mean``, slicing, ``permute``,
``torch.cat``, ``einops.rearrange`` ...), not only inside ``nn.Module``
children.  They are meant as reference models for a sharded-activation
runtime (a tensor subclass sharding the T and/or H dims of (B, C, T, H, W)
activations): running a zoo model on sharded input must reproduce its
single-device output and gradients.

All models use 8-16 channels so that a float64 forward+backward on CPU at
the default input shape (see ``ZOO``) takes well under a second, and they
are deterministic given ``torch.manual_seed`` (parameters are created in a
fixed order; no dropout).

Every model has ``output_shape(input_shape) -> tuple[int, ...]`` giving the
shape of its output for an accepted input shape.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "S3DHead",
    "X3DSqueezeExcite",
    "CausalConvNet",
    "UNet3D",
    "VAEDecoder",
    "PerPositionHead",
    "TinyVideoTransformer",
    "SlowFastStyle",
    "ZOO",
]


def _conv_bn_relu(cin: int, cout: int, kernel, stride=1, padding=0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------
# 1. S3D (torchvision.models.video.s3d)
# --------------------------------------------------------------------------
class _TemporalSeparableConv(nn.Sequential):
    """torchvision S3D ``TemporalSeparableConv``: (1,k,k) conv then (k,1,1) conv."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__(
            _conv_bn_relu(cin, cout, (1, k, k), stride=(1, stride, stride), padding=(0, k // 2, k // 2)),
            _conv_bn_relu(cout, cout, (k, 1, 1), stride=(stride, 1, 1), padding=(k // 2, 0, 0)),
        )


class S3DHead(nn.Module):
    """Style of torchvision's S3D (``torchvision.models.video.S3D``).

    Stem: separable conv ((1,3,3) conv + BN + ReLU, (3,1,1) conv + BN + ReLU),
    ``MaxPool3d((1,3,3), stride=(1,2,2), padding=(0,1,1))``, a second separable
    block, then the torchvision head written in ``forward``:
    ``F.avg_pool3d(kernel_size=(2,4,4), stride=1)`` -> 1x1x1 Conv3d classifier
    -> ``torch.mean(x, dim=(2, 3, 4))``.

    Input (B, 3, T, H, W) with T >= 2, H, W >= 7. Output (B, num_classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = _TemporalSeparableConv(in_channels, 8)
        self.pool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.block = _TemporalSeparableConv(8, 16)
        self.classifier = nn.Conv3d(16, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.pool(x)
        x = self.block(x)
        x = F.avg_pool3d(x, kernel_size=(2, 4, 4), stride=1)
        x = self.classifier(x)
        return torch.mean(x, dim=(2, 3, 4))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], self.num_classes)


# --------------------------------------------------------------------------
# 2. X3D (pytorchvideo.models.x3d)
# --------------------------------------------------------------------------
class _SqueezeExcitation(nn.Module):
    """pytorchvideo / fvcore ``SqueezeExcitation`` with the pooling inside."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc1 = nn.Conv3d(channels, squeeze, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv3d(squeeze, channels, kernel_size=1, bias=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(x)
        s = self.relu(self.fc1(s))
        s = self.sigmoid(self.fc2(s))
        return x * s


class _X3DBottleneck(nn.Module):
    """X3D bottleneck: 1x1x1 conv, depthwise 3x3x3 conv, BN, SE, SiLU, 1x1x1 conv, BN, residual."""

    def __init__(self, cin: int, inner: int, cout: int, spatial_stride: int = 1, use_se: bool = True) -> None:
        super().__init__()
        stride = (1, spatial_stride, spatial_stride)
        self.conv_a = nn.Conv3d(cin, inner, kernel_size=1, bias=False)
        self.norm_a = nn.BatchNorm3d(inner)
        self.act_a = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv3d(inner, inner, kernel_size=3, stride=stride, padding=1, groups=inner, bias=False)
        self.norm_b = nn.BatchNorm3d(inner)
        self.se = _SqueezeExcitation(inner, max(inner // 4, 2)) if use_se else nn.Identity()
        self.act_b = nn.SiLU()
        self.conv_c = nn.Conv3d(inner, cout, kernel_size=1, bias=False)
        self.norm_c = nn.BatchNorm3d(cout)  # after the SE: needs global statistics
        if cin != cout or spatial_stride != 1:
            self.branch1_conv = nn.Conv3d(cin, cout, kernel_size=1, stride=stride, bias=False)
            self.branch1_norm = nn.BatchNorm3d(cout)
        else:
            self.branch1_conv = None
            self.branch1_norm = None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act_a(self.norm_a(self.conv_a(x)))
        y = self.norm_b(self.conv_b(y))
        y = self.se(y)
        y = self.act_b(y)
        y = self.norm_c(self.conv_c(y))
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.act(shortcut + y)


class X3DSqueezeExcite(nn.Module):
    """Style of X3D (``pytorchvideo.models.x3d.create_x3d``).

    Stem: (1,3,3) conv stride (1,2,2) + depthwise (5,1,1) temporal conv + BN + ReLU.
    Two bottleneck blocks (1x1x1 conv, depthwise 3x3x3 conv with
    ``groups=channels``, BN, squeeze-excitation with ``nn.AdaptiveAvgPool3d(1)``
    inside the block, SiLU, 1x1x1 conv, BN after the SE, residual add), the
    second with spatial stride 2 and a projection shortcut.  Head:
    ``nn.AdaptiveAvgPool3d(1)`` + ``flatten`` + ``nn.Linear``.  Meant to be
    used in training mode (batch statistics everywhere).

    Input (B, 3, T, H, W). Output (B, num_classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem_xy = nn.Conv3d(in_channels, 8, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.stem_t = nn.Conv3d(8, 8, kernel_size=(5, 1, 1), padding=(2, 0, 0), groups=8, bias=False)
        self.stem_norm = nn.BatchNorm3d(8)
        self.stem_act = nn.ReLU(inplace=True)
        self.block1 = _X3DBottleneck(8, 16, 8, spatial_stride=1, use_se=True)
        self.block2 = _X3DBottleneck(8, 16, 12, spatial_stride=2, use_se=True)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.proj = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_norm(self.stem_t(self.stem_xy(x))))
        x = self.block1(x)
        x = self.block2(x)
        x = self.pool(x)
        x = x.flatten(1)
        return self.proj(x)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], self.num_classes)


# --------------------------------------------------------------------------
# 3. Causal video-VAE convolutions (CogVideoX / Open-Sora / MAGVIT)
# --------------------------------------------------------------------------
class CausalConvNet(nn.Module):
    """Style of causal 3D convs in video VAEs (CogVideoX ``CogVideoXCausalConv3d``,
    Open-Sora / MAGVIT-v2 ``CausalConv3d``).

    Layer 1: ``F.pad(x, (1, 1, 1, 1, k - 1, 0))`` (zeros; causal in T) then
    ``nn.Conv3d(kernel_size=(k, 3, 3), padding=0)``.
    Layer 2: causal temporal padding by replicating the first frame,
    ``F.pad(x, (0, 0, 0, 0, k - 1, 0), mode="replicate")``, then a conv with
    spatial padding done by the conv itself, ``padding=(0, 1, 1),
    padding_mode="replicate"``, spatial stride 2.
    Layer 3: all causal + spatial padding in one
    ``F.pad(x, (1, 1, 1, 1, k - 1, 0), mode="replicate")`` then a ``padding=0`` conv.
    Each conv is followed by BatchNorm3d + SiLU.  Head:
    ``x.mean(dim=(2, 3, 4))`` + ``nn.Linear``.

    Input (B, 3, T, H, W). Output (B, num_classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, k: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.k = k
        self.conv1 = nn.Conv3d(in_channels, 8, kernel_size=(k, 3, 3), padding=0)
        self.norm1 = nn.BatchNorm3d(8)
        self.conv2 = nn.Conv3d(
            8, 16, kernel_size=(k, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="replicate"
        )
        self.norm2 = nn.BatchNorm3d(16)
        self.conv3 = nn.Conv3d(16, 16, kernel_size=(k, 3, 3), padding=0)
        self.norm3 = nn.BatchNorm3d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        x = F.pad(x, (1, 1, 1, 1, k - 1, 0))
        x = F.silu(self.norm1(self.conv1(x)))
        x = F.pad(x, (0, 0, 0, 0, k - 1, 0), mode="replicate")
        x = F.silu(self.norm2(self.conv2(x)))
        x = F.pad(x, (1, 1, 1, 1, k - 1, 0), mode="replicate")
        x = F.silu(self.norm3(self.conv3(x)))
        x = x.mean(dim=(2, 3, 4))
        return self.head(x)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], self.num_classes)


# --------------------------------------------------------------------------
# 4. 3D U-Net (Cicek et al.; MONAI / pytorch-3dunet style)
# --------------------------------------------------------------------------
class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            _conv_bn_relu(cin, cout, 3, padding=1),
            _conv_bn_relu(cout, cout, 3, padding=1),
        )


class UNet3D(nn.Module):
    """Style of the 3D U-Net (Cicek et al. 2016; ``pytorch-3dunet`` / MONAI ``BasicUNet``).

    Encoder: double Conv3d+BN+ReLU, ``nn.MaxPool3d(2)``, double conv,
    ``nn.MaxPool3d(2)``, bottleneck double conv.  Decoder stage 1 upsamples
    with ``nn.ConvTranspose3d(kernel_size=2, stride=2)``, stage 2 with
    ``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)``;
    skips joined with ``torch.cat([up, skip], dim=1)``.  Output: 1x1x1 Conv3d
    per-position segmentation logits.

    Input (B, 2, T, H, W) with T, H, W divisible by 4.
    Output (B, num_classes, T, H, W).
    """

    def __init__(self, in_channels: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.enc1 = _DoubleConv(in_channels, 8)
        self.pool1 = nn.MaxPool3d(2)
        self.enc2 = _DoubleConv(8, 12)
        self.pool2 = nn.MaxPool3d(2)
        self.bottleneck = _DoubleConv(12, 16)
        self.up2 = nn.ConvTranspose3d(16, 12, kernel_size=2, stride=2)
        self.dec2 = _DoubleConv(24, 12)
        self.up1 = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.dec1 = _DoubleConv(12 + 8, 8)
        self.out = nn.Conv3d(8, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool1(skip1))
        x = self.bottleneck(self.pool2(skip2))
        up = self.up2(x)
        x = self.dec2(torch.cat([up, skip2], dim=1))
        up = self.up1(x)
        x = self.dec1(torch.cat([up, skip1], dim=1))
        return self.out(x)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        b, _, t, h, w = input_shape
        return (b, self.num_classes, t, h, w)


# --------------------------------------------------------------------------
# 5. Video VAE decoder (diffusers AutoencoderKL / CogVideoX / LTX decoders)
# --------------------------------------------------------------------------
class _ResnetBlock3D(nn.Module):
    """diffusers ``ResnetBlock``: GroupNorm + SiLU + conv, twice, plus residual."""

    def __init__(self, cin: int, cout: int, groups: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=cin, eps=1e-6)
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=cout, eps=1e-6)
        self.conv2 = nn.Conv3d(cout, cout, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv3d(cin, cout, kernel_size=1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        h = self.norm1(h)
        h = F.silu(h)
        h = self.conv1(h)
        h = self.norm2(h)
        h = F.silu(h)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class VAEDecoder(nn.Module):
    """Style of a (video) VAE decoder (diffusers ``Decoder`` / taming-transformers,
    as inflated to 3D in CogVideoX / Open-Sora / LTX-Video).

    conv_in (3x3x3), a mid ResNet block (``GroupNorm(4)`` + ``F.silu`` + Conv3d,
    twice, residual), an up block = ResNet block 16 -> 8 (1x1x1 shortcut) then
    ``F.interpolate(x, scale_factor=2, mode="nearest")`` followed by a conv,
    a second upsample
    ``F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=True)``,
    then GroupNorm + SiLU + conv_out to 3 channels.

    Input latent (B, 4, T, H, W). Output (B, 3, 2T, 4H, 4W).
    """

    def __init__(self, latent_channels: int = 4, out_channels: int = 3) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv_in = nn.Conv3d(latent_channels, 16, kernel_size=3, padding=1)
        self.mid = _ResnetBlock3D(16, 16)
        self.up_block = _ResnetBlock3D(16, 8)  # 1x1x1 nin_shortcut for 16 -> 8
        self.up_conv = nn.Conv3d(8, 8, kernel_size=3, padding=1)
        self.norm_out = nn.GroupNorm(num_groups=4, num_channels=8, eps=1e-6)
        self.conv_out = nn.Conv3d(8, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        # diffusers UpDecoderBlock: resnets, then Upsample (interpolate + conv)
        h = self.up_block(h)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up_conv(h)
        h = F.interpolate(h, scale_factor=(1, 2, 2), mode="trilinear", align_corners=True)
        h = self.norm_out(h)
        h = F.silu(h)
        return self.conv_out(h)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        b, _, t, h, w = input_shape
        return (b, self.out_channels, 2 * t, 4 * h, 4 * w)


# --------------------------------------------------------------------------
# 6. Per-position head (channels-last Linear / LayerNorm, ConvNeXt style)
# --------------------------------------------------------------------------
class PerPositionHead(nn.Module):
    """Style of channels-last per-position MLPs (ConvNeXt ``Block``, Video Swin /
    MViT dense heads): conv features, ``x.permute(0, 2, 3, 4, 1)``, an
    ``nn.Linear`` per position, ``nn.LayerNorm`` over channels, GELU, a
    classifier ``nn.Linear``, permuted back with ``permute(0, 4, 1, 2, 3)``.

    Input (B, 3, T, H, W). Output per-position logits (B, num_classes, T, H, W).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16, 3, padding=1),
            nn.Conv3d(16, 16, kernel_size=(3, 3, 3), padding=1),
        )
        self.pwconv = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.act = nn.GELU()
        self.cls = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C)
        x = self.pwconv(x)
        x = self.norm(x)
        x = self.act(x)
        x = self.cls(x)
        return x.permute(0, 4, 1, 2, 3)  # (B, K, T, H, W)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        b, _, t, h, w = input_shape
        return (b, self.num_classes, t, h, w)


# --------------------------------------------------------------------------
# 7. Tiny video transformer (ViViT / VideoMAE / TimeSformer style)
# --------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.proj(out)


class _TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyVideoTransformer(nn.Module):
    """Style of ViViT / VideoMAE / timm ``VisionTransformer`` on video.

    Tubelet embedding ``nn.Conv3d(kernel_size=(2,4,4), stride=(2,4,4))``,
    ``x.flatten(2).transpose(1, 2)`` to tokens (B, N, C), ``+ self.pos_embed``
    (``nn.Parameter`` of shape (1, N, C) fixed by ``input_size``), 2 pre-norm
    transformer layers (LayerNorm, qkv Linear split with
    ``einops.rearrange(qkv, "b n (three h d) -> three b h n d")``,
    ``F.scaled_dot_product_attention`` over all tokens, output projection, GELU
    MLP), final LayerNorm, ``tokens.mean(dim=1)`` + Linear head.

    Input (B, 3, *input_size) with input_size = (T, H, W) = (8, 16, 16) by
    default (N = 4*4*4 = 64 tokens). Output (B, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        input_size: tuple[int, int, int] = (8, 16, 16),
        dim: int = 16,
        heads: int = 2,
        depth: int = 2,
        patch: tuple[int, int, int] = (2, 4, 4),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)
        n = 1
        for s, p in zip(input_size, patch):
            n *= s // p
        self.num_tokens = n
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.layers = nn.ModuleList([_TransformerLayer(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, C, T', H', W')
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = tokens + self.pos_embed
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.norm(tokens)
        return self.head(tokens.mean(dim=1))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], self.num_classes)


# --------------------------------------------------------------------------
# 8. SlowFast (facebookresearch/SlowFast, pytorchvideo.models.slowfast)
# --------------------------------------------------------------------------
class SlowFastStyle(nn.Module):
    """Style of SlowFast (``pytorchvideo.models.slowfast`` / ``slowfast.models``).

    Fast pathway: (5,3,3) conv + BN + ReLU on the full clip.  Slow pathway:
    ``x[:, :, ::4]`` (strided slicing along T, alpha = 4) then (1,3,3) conv + BN
    + ReLU.  Lateral fast->slow connection ``Conv3d(kernel_size=(5,1,1),
    stride=(4,1,1), padding=(2,0,0))`` fused with ``torch.cat`` along
    channels, followed by a (3,3,3) slow conv and a (3,3,3) fast conv.  Both
    pathways pooled by ``nn.AdaptiveAvgPool3d(1)``, concatenated, Linear head.

    Input (B, 3, T, H, W) with T divisible by 4. Output (B, num_classes).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, alpha: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.alpha = alpha
        self.fast_stem = _conv_bn_relu(in_channels, 8, (5, 3, 3), padding=(2, 1, 1))
        self.slow_stem = _conv_bn_relu(in_channels, 16, (1, 3, 3), padding=(0, 1, 1))
        self.lateral = nn.Conv3d(8, 8, kernel_size=(5, 1, 1), stride=(alpha, 1, 1), padding=(2, 0, 0), bias=False)
        self.slow_res = _conv_bn_relu(16 + 8, 16, 3, padding=1)
        self.fast_res = _conv_bn_relu(8, 8, 3, padding=1)
        self.slow_pool = nn.AdaptiveAvgPool3d(1)
        self.fast_pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(16 + 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.fast_stem(x)
        slow = self.slow_stem(x[:, :, :: self.alpha])
        slow = torch.cat([slow, self.lateral(fast)], dim=1)
        slow = self.slow_res(slow)
        fast = self.fast_res(fast)
        pooled = torch.cat([self.slow_pool(slow).flatten(1), self.fast_pool(fast).flatten(1)], dim=1)
        return self.head(pooled)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (input_shape[0], self.num_classes)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "S3DHead": (S3DHead, (2, 3, 8, 16, 16)),
    "X3DSqueezeExcite": (X3DSqueezeExcite, (2, 3, 8, 16, 16)),
    "CausalConvNet": (CausalConvNet, (2, 3, 8, 16, 16)),
    "UNet3D": (UNet3D, (1, 2, 8, 16, 16)),
    "VAEDecoder": (VAEDecoder, (1, 4, 8, 16, 16)),
    "PerPositionHead": (PerPositionHead, (2, 3, 8, 16, 16)),
    "TinyVideoTransformer": (TinyVideoTransformer, (2, 3, 8, 16, 16)),
    "SlowFastStyle": (SlowFastStyle, (2, 3, 16, 16, 16)),
}
