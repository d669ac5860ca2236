"""``insert_nonlocal``: non-local blocks added after chosen residual blocks of a video ResNet.

As in the paper (5 blocks in res3 and res4 of I3D) and mmaction2's ``non_local`` stage masks, each
chosen residual block gets a ``NonLocalBlock`` applied to its output. The block is stored as the
residual block's child ``non_local_block`` (mmaction2's name, so the residual block's own
parameters keep their names and a pretrained state dict still loads) and run by a forward hook.
Its BatchNorm weight starts at zero, so the network computes exactly what it computed before
(``zero_init=False`` starts it at one instead, for a network trained from scratch).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from nonlocal_dist.block import NonLocalBlock

__all__ = ["insert_nonlocal", "out_channels", "stages"]

NONLOCAL_ATTR = "non_local_block"
_STAGE = re.compile(r"layer(\d+)")


def insert_nonlocal(
    model: nn.Module,
    after: Sequence[Sequence[int]] | Sequence[str],
    *,
    mode: str = "embedded_gaussian",
    sub_sample: bool | dict[str, int] | None = None,
    use_scale: bool = False,
    zero_init: bool = True,
    **block_kwargs: Any,
) -> nn.Module:
    """Add a ``NonLocalBlock`` after each chosen residual block; returns ``model``.

    ``after`` chooses the residual blocks either as a per-stage mask over the children ``layer1``,
    ``layer2``, ... (torchvision's and mmaction2's names; ``((0, 0, 0), (1, 0, 1, 0), ...)``, one
    entry per residual block of each stage) or as module paths (``("layer2.0", "layer3.2")``).
    Each block maps (B, C, T, H, W) -> (B, C, T, H, W) with C the residual block's output channels:
    its ``out_channels`` attribute if it has one, else those of its last registered BatchNorm or
    convolution. ``mode``, ``sub_sample`` (default: max-pool phi and g 2x2 in space, mmaction2's
    ``sub_sample=True``), ``use_scale`` and ``block_kwargs`` go to ``NonLocalBlock``.
    """
    if sub_sample is None:
        sub_sample = {"h": 2, "w": 2}
    for path in _chosen_paths(model, after):
        target = model.get_submodule(path)
        if hasattr(target, NONLOCAL_ATTR):
            raise ValueError(f"{path} ({type(target).__name__}) already has a {NONLOCAL_ATTR!r}; insert once per block")
        channels = out_channels(target, path)
        block = NonLocalBlock(channels, mode=mode, sub_sample=sub_sample, use_scale=use_scale, **block_kwargs)
        if not zero_init:
            if block.norm is not None:
                nn.init.ones_(block.norm.weight)
            else:
                block.W_z.reset_parameters()
        target.add_module(NONLOCAL_ATTR, block)
        target.register_forward_hook(_run_nonlocal)
    return model


def _run_nonlocal(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    # Looked up on every call: a parallelized or checkpointed replacement of the child is what runs.
    return getattr(module, NONLOCAL_ATTR)(output)


def out_channels(block: nn.Module, path: str = "") -> int:
    """Output channels of a residual block: ``block.out_channels``, else its last BatchNorm's or conv's."""
    declared = getattr(block, "out_channels", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    last = None
    for module in block.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            last = module.num_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            last = module.out_channels
    if last is None:
        raise ValueError(
            f"cannot tell the output channels of {path or 'the module'} ({type(block).__name__}): it has no "
            "'out_channels' attribute, BatchNorm or convolution. Give it an 'out_channels' int attribute, "
            "or choose a residual block that ends in a convolution or BatchNorm."
        )
    return last


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) children ``layer1``, ``layer2``, ... of a ResNet, in order of their number."""
    found = [(int(m.group(1)), name, child) for name, child in model.named_children() if (m := _STAGE.fullmatch(name))]
    return [(name, child) for _, name, child in sorted(found)]


def _chosen_paths(model: nn.Module, after) -> list[str]:
    if isinstance(after, str) or not isinstance(after, Sequence):
        raise TypeError(
            f"after must be a per-stage mask (e.g. ((0, 0), (1, 0))) or a sequence of module paths "
            f"(e.g. ('layer2.0',)), got {after!r}"
        )
    if all(isinstance(p, str) for p in after):
        names = dict(model.named_modules())
        missing = [p for p in after if p not in names or p == ""]
        if missing:
            raise ValueError(f"no module at {missing} in {type(model).__name__}; paths are names from named_modules()")
        return list(after)
    return _mask_paths(model, after)


def _mask_paths(model: nn.Module, mask) -> list[str]:
    found = stages(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no children layer1, layer2, ... (torchvision's and mmaction2's stage "
            "names) for a stage mask to refer to; pass module paths instead, e.g. after=('blocks.2',)"
        )
    lengths = [len(stage) for _, stage in found]
    ok = all(isinstance(m, Sequence) and not isinstance(m, str) for m in mask)
    if not ok or [len(m) for m in mask] != lengths or any(v not in (0, 1) for m in mask for v in m):
        raise ValueError(
            f"a non-local stage mask needs one 0/1 per residual block of each stage {[n for n, _ in found]} "
            f"of {type(model).__name__}, i.e. lengths {lengths}; got {mask!r}"
        )
    return [f"{name}.{index}" for (name, _), m in zip(found, mask) for index, v in enumerate(m) if v]
