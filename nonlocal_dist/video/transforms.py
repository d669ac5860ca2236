"""Crop, flip and normalisation of decoded clips, with random parameters drawn from a clip's own
generator (seeded by clip index, epoch and seed), so that every rank of a sequence-parallel group,
each holding another time shard of the clip, crops and flips it alike. Resizing happens at decode
time (``read_frames(size=...)``), frame by frame."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # mmaction2's Normalize defaults, on 0..255 values
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class CropFlip:
    """One draw: the crop box (top, left, height, width) in the resized frame, and a horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of clip ``index`` in ``epoch``: the same on every rank and in every worker."""
    return np.random.default_rng((int(seed), int(epoch), int(index)))


@dataclass(frozen=True)
class ClipTransform:
    """mmaction2's ``Resize(scale=(-1, short_side))`` -> ``RandomCrop``/``CenterCrop(crop_size)`` ->
    ``Flip(flip_ratio)`` -> ``Normalize(mean, std)``; test mode crops the centre and never flips.

    ``short_side`` None keeps the decoded size; ``crop_size`` None keeps the whole frame (clips of
    one batch must then share a size); ``mean``/``std`` one value per channel, on 0..255 values.
    """

    short_side: int | None = None
    crop_size: int | tuple[int, int] | None = None
    flip_ratio: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side < 1):
            raise ValueError(f"short_side must be None or an int >= 1, got {self.short_side!r}")
        crop = self.crop_size
        if crop is not None:
            pair = (crop, crop) if isinstance(crop, int) else tuple(crop)
            if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
                raise ValueError(f"crop_size must be None, an int or a pair of ints (H, W) >= 1, got {crop!r}")
            object.__setattr__(self, "crop_size", pair)
        if not 0.0 <= self.flip_ratio <= 1.0:
            raise ValueError(f"flip_ratio must be in [0, 1], got {self.flip_ratio}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need one value per channel, std > 0; got mean {self.mean}, std {self.std}")
        shape = (len(self.mean), 1, 1, 1)
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(shape))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(shape))

    def draw(self, rng: np.random.Generator, height: int, width: int, test_mode: bool) -> CropFlip:
        """Crop box and flip for a (resized) frame of ``height`` x ``width``."""
        crop_h, crop_w = self.crop_size or (height, width)
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop_size {(crop_h, crop_w)} is larger than the resized frame {(height, width)}; "
                             "lower crop_size or raise short_side")
        if test_mode:
            return CropFlip((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, False)
        top = int(rng.integers(height - crop_h + 1))
        left = int(rng.integers(width - crop_w + 1))
        return CropFlip(top, left, crop_h, crop_w, bool(rng.random() < self.flip_ratio))

    def __call__(self, clip: Tensor, box: CropFlip) -> Tensor:
        """(..., C, T, H, W) uint8 -> (..., C, T, h, w) float32: cropped, flipped, (x - mean) / std."""
        if clip.shape[-4] != len(self.mean):
            raise ValueError(f"the clip has {clip.shape[-4]} channels, mean/std give {len(self.mean)}; "
                             "give one mean and std per channel (fmt='gray': one)")
        x = clip[..., box.top : box.top + box.height, box.left : box.left + box.width]
        if box.flip:
            x = x.flip(-1)
        return x.to(torch.float32, copy=True).sub_(self._mean).div_(self._std)
