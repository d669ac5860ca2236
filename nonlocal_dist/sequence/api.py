"""``parallel_nonlocal``: the sequence-parallel entry point behind ``nonlocal_op(..., group=)``."""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.backends import dispatch
from nonlocal_dist.distributed.checks import agree_across_ranks
from nonlocal_dist.sequence.strategies import (
    MODE_STRATEGIES,
    STRATEGIES,
    check_backend,
    default_strategy,
)
from nonlocal_dist.validate import check_op_inputs


def _check_strategy(mode: str, strategy: str | None, heads: int, world: int, key_bytes: int | None = None) -> str:
    allowed = MODE_STRATEGIES[mode]
    strategy = default_strategy(mode, key_bytes) if strategy is None else strategy
    if strategy not in allowed:
        raise ValueError(f"strategy {strategy!r} cannot run mode {mode!r}; choose one of {', '.join(allowed)} (or None)")
    if strategy == "ulysses" and heads % world:
        raise ValueError(
            f"strategy 'ulysses' needs the number of heads ({heads}) divisible by the group size ({world}); "
            "use strategy='ring' or 'allgather', or a heads count that the group size divides"
        )
    return strategy


def _validated(theta, phi, g, mode, scale, concat_weight, backend, strategy, world: int,
               key_lengths: list[int] | None = None):
    """This rank's inputs checked (``validate.check_op_inputs``), the strategy chosen and checked
    against the mode, the group size and the backend: (inputs, added_heads, strategy).
    ``key_lengths``: every rank's key count where a spec proves it; then a small key set picks the
    all-gather by default (the same bytes on every rank)."""
    inputs, added_heads = check_op_inputs(theta, phi, g, mode, scale, concat_weight, backend, allow_empty_positions=True)
    key_bytes = None if key_lengths is None else (sum(key_lengths) * inputs.phi.shape[0] * inputs.phi.shape[1] * (
        inputs.phi.shape[-1] + inputs.g.shape[-1]) * inputs.phi.element_size())
    chosen = _check_strategy(mode, strategy, inputs.theta.shape[1], world, key_bytes)
    check_backend(chosen, inputs, backend)
    return inputs, added_heads, chosen


def check_strategy_alone(theta: Tensor, phi: Tensor, g: Tensor, mode: str, *, scale: float | None,
                         concat_weight: Tensor | None, backend: str, strategy: str) -> None:
    """The checks a group of two or more ranks makes of ``strategy`` and ``backend`` (the mode can run
    the strategy, the strategy can honour the backend), for a block that runs alone on a group of
    one, where no strategy runs: a configuration refused on two ranks is refused on one too. (Ulysses'
    heads divisible by the group size is the one check that depends on the group's size.)"""
    _validated(theta, phi, g, mode, scale, concat_weight, backend, strategy, 1)


def parallel_nonlocal(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    mode: str,
    *,
    scale: float | None,
    concat_weight: Tensor | None,
    backend: str,
    group,
    strategy: str | None,
    lengths: tuple[list[int], list[int]] | None = None,
) -> Tensor:
    """This rank's y shard; theta/phi/g are this rank's query/key shards (sizes may differ by rank).

    Every rank first validates its inputs and all-gathers a small metadata row
    (``distributed.checks.agree_across_ranks``): a rank whose inputs are invalid raises its own error and
    all others raise too, naming it; ranks disagreeing on mode, strategy, dtype, shapes or the
    replicated ``concat_weight`` all raise, naming every rank's value. ``strategy=None`` picks the mode's
    lowest-memory strategy (``strategies.default_strategy``; with ``lengths``, the all-gather for a key
    set of at most ``SMALL_KEYS_BYTES``); a ``backend`` the strategy cannot honour
    is refused there too (``strategies.check_backend``), before any collective of the operation.

    ``lengths``: every rank's N and M where a shard spec already proves them and the settings (a
    ``NonLocalBlock`` on a ``ShardedTensor`` under ``parallelize``, whose one agreement per call covers
    inputs, parameters and block settings): the inputs are then checked locally, with no collective.
    """
    if not dist.is_initialized():
        raise RuntimeError("group= was given but torch.distributed is not initialised; call init_process_group first")
    world = dist.get_world_size(group)

    def validate():
        inputs, added_heads, chosen = _validated(theta, phi, g, mode, scale, concat_weight, backend, strategy, world,
                                                 None if lengths is None else lengths[1])
        b, h, n, d = inputs.theta.shape
        fields = {"B": b, "H": h, "N": n, "M": inputs.phi.shape[2], "d": d, "dv": inputs.g.shape[-1],
                  "ndim": theta.dim(), "dtype": inputs.theta.dtype, "mode": mode, "strategy": chosen,
                  "scale": inputs.scale, "concat_weight": inputs.concat_weight}
        return (inputs, added_heads, chosen), fields

    names = ("B", "H", "N", "M", "d", "dv", "ndim", "dtype", "mode", "strategy", "scale", "concat_weight")
    if lengths is not None:
        (inputs, added_heads, chosen), _ = validate()
        values = {"N": list(lengths[0]), "M": list(lengths[1])}
        rank = dist.get_rank(group)
        if (inputs.theta.shape[2], inputs.phi.shape[2]) != (values["N"][rank], values["M"][rank]):
            raise RuntimeError(f"internal: rank {rank} holds N={inputs.theta.shape[2]}, M={inputs.phi.shape[2]} "
                               f"positions, its spec says {values['N'][rank]}, {values['M'][rank]}")
    else:
        (inputs, added_heads, chosen), values = agree_across_ranks(group, validate, names, what="nonlocal_op",
                                                                   free=("N", "M"))
    if sum(values["N"]) == 0 or sum(values["M"]) == 0:  # every rank sees the same sums: all raise
        raise ValueError(f"the group holds no {'query' if sum(values['N']) == 0 else 'key'} positions (N per rank = "
                         f"{values['N']}, M per rank = {values['M']}); a shard may be empty, the whole sequence not")
    if world == 1:  # the whole sequence on this rank: the single-device dispatch (the strategy was checked)
        y = dispatch(inputs, backend)
    else:
        y = STRATEGIES[chosen](inputs, group, values["N"], values["M"], backend)
    return y.squeeze(1) if added_heads else y
