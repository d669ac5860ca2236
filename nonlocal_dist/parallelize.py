"""``parallelize(model, group, axis)``: a single-device video model sharded over one axis, in place.

The model is written for one device; this function applies sequence parallelism from outside (as
torchtitan's ``parallelize_*`` functions do): every layer that acts along the shard axis becomes its
sharded equivalent (``nonlocal_dist.parallel.layers``) by a class swap, so parameters, buffers,
state-dict keys and hooks stay the same objects, and each ``NonLocalBlock`` gets ``sp_group``.

Which modules see a sharded tensor is read from the module order: everything before the first
global average pool (an adaptive average pool to size 1 along the shard axis) is taken to see this
rank's shard, everything after it the pooled features, identical on every rank (a classification
head). A reduction written as code in a ``forward`` (``x.mean(dim=2)``) is invisible here: write it
as a module (``nn.AdaptiveAvgPool3d(1)``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _ntuple

from nonlocal_dist.block import NonLocalBlock
from nonlocal_dist.parallel import layers
from nonlocal_dist.parallel.agreement import ForwardAgreement
from nonlocal_dist.parallel.checks import exchange_device
from nonlocal_dist.parallel.window import Window

AXES = ("t", "h", "w")

# (PyTorch layer, its sharded equivalent, number of spatial dims)
_CONVS = [(nn.Conv1d, layers.ShardedConv1d, 1), (nn.Conv2d, layers.ShardedConv2d, 2), (nn.Conv3d, layers.ShardedConv3d, 3)]
_MAX_POOLS = [(nn.MaxPool1d, layers.ShardedMaxPool1d, 1), (nn.MaxPool2d, layers.ShardedMaxPool2d, 2),
              (nn.MaxPool3d, layers.ShardedMaxPool3d, 3)]
_AVG_POOLS = [(nn.AvgPool1d, layers.ShardedAvgPool1d, 1), (nn.AvgPool2d, layers.ShardedAvgPool2d, 2),
              (nn.AvgPool3d, layers.ShardedAvgPool3d, 3)]
_NORMS = [(nn.BatchNorm1d, layers.ShardedBatchNorm1d, 1), (nn.BatchNorm2d, layers.ShardedBatchNorm2d, 2),
          (nn.BatchNorm3d, layers.ShardedBatchNorm3d, 3)]
_GLOBAL_POOLS = [(nn.AdaptiveAvgPool1d, layers.ShardedAdaptiveAvgPool1d, 1),
                 (nn.AdaptiveAvgPool2d, layers.ShardedAdaptiveAvgPool2d, 2),
                 (nn.AdaptiveAvgPool3d, layers.ShardedAdaptiveAvgPool3d, 3)]
_ADAPTIVE_MAX_POOLS = [(nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveMaxPool3d, 3)]
_ACTIVATIONS = tuple(
    cls for name in nn.modules.activation.__all__
    if isinstance(cls := getattr(nn.modules.activation, name), type)
    and name not in ("MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d")
)
_POSITION_WISE = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, *_ACTIVATIONS)
# Leaf modules that mix positions along any axis in ways no sharded layer here reproduces.
_REFUSED = (nn.modules.conv._ConvTransposeNd, nn.Upsample, nn.Linear, nn.Bilinear, nn.Flatten, nn.Unflatten,
            nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
            nn.SyncBatchNorm, nn.Fold, nn.Unfold, nn.PixelShuffle, nn.PixelUnshuffle, nn.MultiheadAttention)


def _shard_dim(module: nn.Module, spatial: int, axis: str, path: str) -> int:
    """The dim of ``axis`` in the (B, C, *spatial) input of ``module``."""
    if spatial == 1:
        return 2
    names = AXES[-spatial:]
    if axis not in names:
        raise ValueError(
            f"{path} ({type(module).__name__}) is a {spatial}D layer over {' '.join(names)}: it has no axis "
            f"{axis!r}. A model that folds {axis!r} into the batch treats it position-wise: pass "
            f"position_wise=({type(module).__name__},) to parallelize if that is so."
        )
    return 2 + names.index(axis)


def _window(module: nn.Module, index: int, spatial: int) -> Window:
    """The sliding window of a conv or pool along spatial dim ``index``."""
    ntuple = _ntuple(spatial)
    kernel = ntuple(module.kernel_size)[index]
    stride = ntuple(module.stride if module.stride is not None else module.kernel_size)[index]
    dilation = ntuple(getattr(module, "dilation", 1))[index]
    if isinstance(module, nn.modules.conv._ConvNd):
        pad = module._reversed_padding_repeated_twice[2 * (spatial - 1 - index) :][:2]
        return Window(kernel, stride, dilation, pad[0], pad[1])
    padding = ntuple(module.padding)[index]
    return Window(kernel, stride, dilation, padding, padding)


def _refuse(path: str, module: nn.Module, axis: str, why: str) -> ValueError:
    return ValueError(f"parallelize cannot shard {path or 'the model'} ({type(module).__name__}) along {axis!r}: {why}")


def _swap(module: nn.Module, base: type, cls: type, group, dim: int, spatial: int, **extra) -> None:
    """Make ``module`` a ``cls`` (the sharded ``base``) in place. BatchNorm subclasses are taken to be
    BatchNorm (a custom forward there is usually a dtype or layout wrapper, as in C2D)."""
    if type(module).forward is not base.forward and not isinstance(module, _BatchNorm):
        raise ValueError(
            f"{type(module).__name__} overrides forward: parallelize replaces forward with the sharded "
            f"{base.__name__}'s and would drop that code. Convert its layers instead."
        )
    module.__class__ = cls
    module.sp_group, module.shard_dim, module.spatial_dims = group, dim, spatial
    for name, value in extra.items():
        setattr(module, name, value)


def _convert_window(path, module, row, group, axis) -> None:
    base, cls, spatial = row
    dim = _shard_dim(module, spatial, axis, path)
    window = _window(module, dim - 2, spatial)
    if window.position_wise:
        return
    why = window.refusal()
    if why is None and getattr(module, "padding_mode", "zeros") != "zeros" and window.pad_left + window.pad_right:
        why = f"padding_mode={module.padding_mode!r} along the shard axis (only 'zeros' crosses shards)"
    if why is None and getattr(module, "ceil_mode", False):
        why = "ceil_mode=True (its extra window at the end is not supported); use ceil_mode=False"
    if why is None and getattr(module, "return_indices", False):
        why = "return_indices=True (indices would be local to each shard)"
    if why is not None:
        raise _refuse(path, module, axis, why)
    _swap(module, base, cls, group, dim, spatial, window=window)


def _convert_block(path: str, block: NonLocalBlock, group, axis: str, strategy: str | None) -> None:
    if axis not in block.layout.axes:
        raise _refuse(
            path, block, axis,
            f"the block's interacting axes are {block.layout.axes} (layout {block.layout.text!r}); a block that "
            "folds the shard axis into its batch would need group BatchNorm statistics without sharded "
            "attention. Give the block axes that include it.",
        )
    block.sp_group, block.shard_axis, block.sp_strategy = group, axis, strategy


def _match(module: nn.Module, table: list) -> tuple | None:
    return next((row for row in table if isinstance(module, row[0])), None)


def parallelize(
    model: nn.Module,
    group: dist.ProcessGroup,
    axis: str = "t",
    *,
    strategy: str | None = None,
    position_wise: tuple[type, ...] = (),
) -> nn.Module:
    """Shard ``model`` over ``group`` along ``axis`` in place and return it.

    ``axis``: ``t``, ``h`` or ``w`` of the (B, C, T, H, W) input of 3D layers (``h``/``w`` for 2D
    layers; 1D layers shard their one position axis). Afterwards each rank feeds its slice of the
    input (``nonlocal_dist.parallel.shard_tensor(x, "b c t h w", axis, group)``); activations stay
    sharded until the global average pool, after which every rank holds the same features.
    Converted: Conv1/2/3d (any kernel, padding, dilation; stride when the shard boundaries fall on
    the stride grid), Max/AvgPool1/2/3d, BatchNorm1/2/3d (group statistics), AdaptiveAvgPool with
    size 1 along the axis, and NonLocalBlock (``sp_group``, ``shard_axis``, ``strategy``). Layers
    that are position-wise along the axis are left alone; others (ConvTranspose, Upsample, Linear
    or Flatten before the pool, ...) raise naming the module. ``position_wise``: extra module
    classes to pass unchanged (custom activations). Loss: a loss computed on every rank from the
    pooled features is divided by the group size (``integrations.deepspeed_sp.loss_scale``), so that
    each rank's parameter gradient is its part and their sum is the single-device gradient.
    ``nn.Dropout`` after the pool becomes ``ReplicatedDropout`` (one mask on every rank: a seed
    broadcast from the group's first rank, so parallelize is then a collective call). The
    converted layers agree on shard lengths once per model input shapes (one all-gather when
    ``model``'s forward starts: ``parallel.agreement``), not once per layer and step.
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (dist.group.WORLD for all ranks), got {group!r}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    pooled, skip, agreement, dropouts = False, [], ForwardAgreement(group), []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, layers._Sharded) or getattr(module, "sp_group", None) is not None:
            raise ValueError(f"{path or 'the model'} ({type(module).__name__}) is already sharded: parallelize a model once")
        if isinstance(module, NonLocalBlock):
            _convert_block(path, module, group, axis, strategy)
            skip.append(path + "." if path else "")
        elif pooled and isinstance(module, nn.modules.dropout._DropoutNd):
            dropouts.append(_convert_head_dropout(path, module, axis))
        elif isinstance(module, tuple(position_wise) + _POSITION_WISE):
            continue
        elif row := _match(module, _CONVS + _MAX_POOLS + _AVG_POOLS):
            _convert_window(path, module, row, group, axis)
        elif row := _match(module, _GLOBAL_POOLS):
            pooled = _convert_global_pool(path, module, row, group, axis) or pooled
        elif row := _match(module, _ADAPTIVE_MAX_POOLS):
            if _ntuple(row[1])(module.output_size)[_shard_dim(module, row[1], axis, path) - 2] is not None:
                raise _refuse(path, module, axis, "adaptive max pooling along it is not supported")
        elif pooled and not list(module.children()):
            continue  # the head: pooled features, the same on every rank
        elif isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            row = _match(module, _NORMS)
            if row is None:
                raise _refuse(path, module, axis, "a BatchNorm that is not a BatchNorm1d/2d/3d")
            _swap(module, *row[:2], group, None, None)
        elif isinstance(module, _REFUSED):
            raise _refuse(path, module, axis, "it mixes positions and no sharded equivalent exists (if it only "
                          "runs after the global pooling, register it after the pooling module)")
        elif not list(module.children()):
            raise _refuse(path, module, axis, "parallelize cannot tell whether it is position-wise; if it is, "
                          f"pass position_wise=({type(module).__name__},)")
    for module in model.modules():
        if isinstance(module, (layers._Sharded, NonLocalBlock)):
            module.sp_agreement = agreement
    agreement.attach(model)
    if dropouts:  # the same on every rank (one model): so is this broadcast
        seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.int64, device=exchange_device(group))
        dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        for index, module in enumerate(dropouts):
            module.seed = int(seed) + index
    return model


def _convert_head_dropout(path: str, module: nn.Module, axis: str) -> nn.Module:
    """Dropout after the global pool acts on features every rank holds whole: the same mask everywhere."""
    if type(module) is not nn.Dropout:
        raise _refuse(path, module, axis, f"{type(module).__name__} after the global pooling would draw a different mask "
                      "on each rank for the features they all hold; use nn.Dropout there (it becomes ReplicatedDropout)")
    module.__class__ = layers.ReplicatedDropout
    return module


def _convert_global_pool(path, module, row, group, axis) -> bool:
    """Convert an adaptive average pool; True when it pools the shard axis to one position."""
    base, cls, spatial = row
    dim = _shard_dim(module, spatial, axis, path)
    size = _ntuple(spatial)(module.output_size)[dim - 2]
    if size is None:
        return False
    if size != 1:
        raise _refuse(path, module, axis, f"output size {size} along it (only 1, the global mean, or None)")
    _swap(module, base, cls, group, dim, spatial)
    return True
