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

from nonlocal_dist.distributed.mesh import span_group
from nonlocal_dist.sequence.shard import gather_tensor
from nonlocal_dist.sharded.distribute import distribute, full_tensor
from nonlocal_dist.sharded.tensor import ShardedTensor


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place: ``sp_size`` ranks share a sample (SP); SP groups are data parallel.

    ``mesh``: the DeviceMesh the groups come from (``sequence_parallel_from_mesh``), with ``sp_axes``
    its SP dims, named after the tensor axes they shard; None for DeepSpeed's own contiguous groups."""

    sp_size: int
    sp_rank: int
    dp_size: int
    dp_rank: int
    sp_group: object | None
    seq_dp_group: object | None
    mpu: object | None
    mesh: object | None = None
    sp_axes: tuple[str, ...] = ("t",)


class MeshGroups:
    """DeepSpeed's sequence-parallel ``mpu`` (the interface of its ``parallel_state_sp``) answered by
    groups taken from a mesh: SP = one group over the mesh's SP dims, SP x DP = every rank of the mesh.
    DeepSpeed recognises this kind of mpu by its ``initialize_sequence_parallel`` attribute."""

    def __init__(self, sp_group, seq_dp_group) -> None:
        self.sp_group, self.seq_dp_group = sp_group, seq_dp_group

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        raise RuntimeError("the sequence-parallel groups come from the DeviceMesh; nothing to initialise")

    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return dist.get_world_size(self.sp_group)

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self.sp_group)

    def get_sequence_data_parallel_group(self):
        return self.seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.seq_dp_group)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.seq_dp_group)


def init_distributed(backend: str | None = None, timeout=None) -> None:
    """``deepspeed.init_distributed`` (``backend`` default: nccl with CUDA, else gloo) without DeepSpeed's
    shared-memory all-reduce op; a no-op when DeepSpeed's communication is already up.

    DeepSpeed 0.19 JIT-compiles its ``deepspeed_shm_comm`` C++ op whenever its communication starts,
    which this library never uses (it serves only ``inference_all_reduce``; every collective here goes
    through ``torch.distributed``): on a machine without the build cached, every rank compiles it inside
    the start-up, under a file lock that a rank killed mid-build leaves behind for every later start to
    wait on, and the op's own rendezvous waits without a timeout for a peer that died. Marking the op
    incompatible makes DeepSpeed skip it (``deepspeed.ops.__compatible_ops__`` is one dict, kept).
    """
    import deepspeed
    import torch

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if deepspeed.comm.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


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
        raise RuntimeError("initialise torch.distributed (nonlocal_dist.integrations.deepspeed_sp.init_distributed()) before the SP groups")
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sequence_parallel_size must divide the world size {world}, got {sp_size}")
    if sp_size == 1:
        return SequenceParallel(1, 0, world, rank, None, None, None)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    init_distributed(dist.get_backend())  # torch.distributed set up by the caller: DeepSpeed wraps it
    parallel_state_sp.initialize_sequence_parallel(sp_size)
    return SequenceParallel(
        sp_size, rank % sp_size, world // sp_size, rank // sp_size,
        parallel_state_sp.get_sequence_parallel_group(), parallel_state_sp.get_sequence_data_parallel_group(),
        parallel_state_sp,
    )


def sequence_parallel_from_mesh(mesh, dp_dim: str = "dp") -> SequenceParallel:
    """SP and DP groups from a DeviceMesh with named dims: ``dp_dim`` (absent: no data parallelism) and
    the SP dims, each named after the tensor axis it shards (``("dp", "t")``, or ``("dp", "t", "h")``
    for a 2-D SP mesh). Every rank must call it (the SP and SP x DP groups spanning several mesh dims
    are made here, once). ``shard_batch`` then shards along the SP dims, ``initialize`` hands DeepSpeed
    these groups, and DeepSpeed averages gradients over ``dp_dim``.
    """
    names = tuple(mesh.mesh_dim_names or ())
    if not names:
        raise ValueError("the DeviceMesh needs named dims (init_device_mesh(..., mesh_dim_names=('dp', 't')))")
    sp_axes = tuple(n for n in names if n != dp_dim)
    if not sp_axes:
        raise ValueError(f"mesh dims {names}: besides {dp_dim!r} at least one dim must shard a tensor axis (e.g. 't')")
    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed (nonlocal_dist.integrations.deepspeed_sp.init_distributed()) before the SP groups")
    init_distributed(dist.get_backend())
    sp_lines = [mesh.get_group(a) for a in sp_axes]
    sp_group = span_group(sp_lines)
    dp_lines = [mesh.get_group(dp_dim)] if dp_dim in names else []
    seq_dp_group = span_group(dp_lines + sp_lines)
    sp_size = dist.get_world_size(sp_group)
    dp_size = dist.get_world_size(seq_dp_group) // sp_size
    dp_rank = mesh.get_local_rank(dp_dim) if dp_lines else 0
    return SequenceParallel(sp_size, dist.get_rank(sp_group), dp_size, dp_rank, sp_group, seq_dp_group,
                            MeshGroups(sp_group, seq_dp_group), mesh, sp_axes)


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

    init_distributed(dist.get_backend() if dist.is_initialized() else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config, mpu=sp.mpu
    )
    world = dist.get_world_size(sp.seq_dp_group) if sp.seq_dp_group is not None else dist.get_world_size()
    if engine.seq_dp_world_size != world or engine.sequence_parallel_size != sp.sp_size:
        raise RuntimeError(
            f"DeepSpeed built sequence_parallel_size={engine.sequence_parallel_size}, "
            f"seq_dp_world_size={engine.seq_dp_world_size}; expected {sp.sp_size} and {world}"
        )
    return engine


def shard_batch(x, sp: SequenceParallel, layout: str = "b c t h w", axis: str | None = None):
    """This rank's contiguous slice of a batch along ``axis`` as a ``ShardedTensor`` (uneven when it does
    not divide); the batch itself when ``sp_size`` is 1. ``layout`` names x's axes; ``axis`` defaults
    to the mesh's SP dims (``sequence_parallel_from_mesh``), else "t"."""
    if sp.sp_group is None:
        return x
    if sp.mesh is not None:
        return distribute(x, sp.mesh, layout, sp.sp_axes if axis is None else axis)
    return distribute(x, sp.sp_group, layout, axis or "t")


def gather_predictions(y, sp: SequenceParallel, layout: str = "b c t h w", axis: str = "t"):
    """Dense predictions (or any per-position output) of every SP rank concatenated along ``axis``,
    on every rank: the inverse of ``shard_batch``. Not differentiable (for evaluation and logging)."""
    if isinstance(y, ShardedTensor):
        return full_tensor(y).detach()
    return y if sp.sp_group is None else gather_tensor(y, layout, axis, sp.sp_group)
