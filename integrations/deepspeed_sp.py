"""Sequence parallelism inside DeepSpeed: groups, ZeRO-3 construction, loss normalisation, engines.

DeepSpeed 0.19 facts this module is built on (see ANCHORS section 3): a ``sequence_parallel_size``
in the config alone creates no group, so an ``mpu`` (DeepSpeed's own ``parallel_state_sp``) is
passed to ``deepspeed.initialize``; gradients are reduced over the sequence x data-parallel group
and divided by the data-parallel size under ZeRO 0/1/2 (a *sum* over SP ranks) but by the whole
group under ZeRO-3 (a *mean* over SP ranks); ZeRO-3 models are built under ``zero.Init`` with that
same group.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch.distributed as dist

from nonlocal_dist.parallel.distribute import distribute, full_tensor
from nonlocal_dist.parallel.sharded import ShardedTensor
from nonlocal_dist.parallel.shard import gather_tensor


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: ``sp_size`` contiguous ranks share a sample (SP); SP groups are data parallel."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: object | None
    seq_dp_group: object | None
    mpu: object | None


def resolve_sp_size(config: dict, sp_size: int | None) -> int:
    """``sp_size`` if given, else the config's ``sequence_parallel_size`` (1 when absent); both given must agree."""
    configured = config.get("sequence_parallel_size")
    if sp_size is None:
        return int(configured or 1)
    if configured is not None and int(configured) != sp_size:
        raise ValueError(
            f"sp_size={sp_size} disagrees with the DeepSpeed config's sequence_parallel_size={configured}; "
            "give one of them or make them equal"
        )
    return sp_size


def init_sequence_parallel(sp_size: int) -> SequenceParallel:
    """Create the SP and SP x DP groups (every rank must call it); ``sp_size`` must divide the world."""
    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed (deepspeed.init_distributed()) before the SP groups")
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sequence_parallel_size must divide the world size {world}, got {sp_size}")
    if sp_size == 1:
        return SequenceParallel(1, 0, world, rank, None, None, None)
    import deepspeed
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if not deepspeed.comm.is_initialized():  # torch.distributed set up by the caller: DeepSpeed wraps it
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    parallel_state_sp.initialize_sequence_parallel(sp_size)
    return SequenceParallel(
        sp_size, rank % sp_size, world // sp_size, rank // sp_size,
        parallel_state_sp.get_sequence_parallel_group(), parallel_state_sp.get_sequence_data_parallel_group(),
        parallel_state_sp,
    )


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def loss_scale(config: dict, sp: SequenceParallel) -> float:
    """Factor for a loss that every SP rank computes in full (from group-reduced features).

    Each SP rank's parameter gradient is its part of the full gradient times ``sp`` when the loss is
    used as is (the reduction's backward sums every rank's copy). DeepSpeed sums over SP ranks under
    ZeRO 0/1/2 and averages under ZeRO-3, so the loss is divided by ``sp`` except under ZeRO-3.
    """
    return 1.0 if zero_stage(config) == 3 else 1.0 / sp.sp_size


def model_context(config: dict, sp: SequenceParallel):
    """``deepspeed.zero.Init`` over the SP x DP group for ZeRO-3 (else a no-op context)."""
    if zero_stage(config) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(data_parallel_group=sp.seq_dp_group, config_dict_or_path=config)


def initialize(model, config: dict, sp: SequenceParallel):
    """``deepspeed.initialize`` with the SP ``mpu``; asserts the group sizes DeepSpeed ended up with."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config, mpu=sp.mpu
    )
    world = dist.get_world_size()
    if engine.seq_dp_world_size != world or engine.sequence_parallel_size != sp.sp_size:
        raise RuntimeError(
            f"DeepSpeed built sequence_parallel_size={engine.sequence_parallel_size}, "
            f"seq_dp_world_size={engine.seq_dp_world_size}; expected {sp.sp_size} and {world}"
        )
    return engine


def shard_batch(x, sp: SequenceParallel, layout: str = "b c t h w", axis: str = "t"):
    """This rank's contiguous slice of a batch along ``axis`` as a ``ShardedTensor`` (uneven when it does
    not divide); the batch itself when ``sp_size`` is 1. ``layout`` names x's axes."""
    return x if sp.sp_group is None else distribute(x, sp.sp_group, layout, axis)


def gather_predictions(y, sp: SequenceParallel, layout: str = "b c t h w", axis: str = "t"):
    """Dense predictions (or any per-position output) of every SP rank concatenated along ``axis``,
    on every rank: the inverse of ``shard_batch``. Not differentiable (for evaluation and logging)."""
    if isinstance(y, ShardedTensor):
        return full_tensor(y).detach()
    return y if sp.sp_group is None else gather_tensor(y, layout, axis, sp.sp_group)
