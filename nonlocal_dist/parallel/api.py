"""``parallel_nonlocal``: the sequence-parallel entry point behind ``nonlocal_op(..., group=)``."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nonlocal_dist.conventions import MODES
from nonlocal_dist.parallel.checks import dtype_code, exchange_metadata, float_code, raise_on_mismatch
from nonlocal_dist.parallel.strategies import MODE_STRATEGIES, STRATEGIES
from nonlocal_dist.validate import check_op_inputs

_STRATEGY_NAMES = tuple(STRATEGIES)


def _check_strategy(mode: str, strategy: str | None, heads: int, world: int, backend: str) -> str:
    allowed = MODE_STRATEGIES[mode]
    strategy = allowed[0] if strategy is None else strategy
    if strategy not in allowed:
        raise ValueError(f"strategy {strategy!r} cannot run mode {mode!r}; choose one of {', '.join(allowed)} (or None)")
    if strategy == "ulysses" and heads % world:
        raise ValueError(
            f"strategy 'ulysses' needs the number of heads ({heads}) divisible by the group size ({world}); "
            "use strategy='ring' or 'allgather', or a heads count that the group size divides"
        )
    if strategy == "ring" and backend not in ("auto", "sdpa"):
        raise ValueError(f"strategy 'ring' runs the fused attention kernels; backend={backend!r} cannot (use 'auto' or 'sdpa')")
    return strategy


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
) -> Tensor:
    """This rank's y shard; theta/phi/g are this rank's query/key shards (sizes may differ by rank).

    Every rank first all-gathers a small metadata row; a rank whose inputs are invalid raises its
    own error and all others raise too, instead of waiting in a collective that never comes.
    """
    if not dist.is_initialized():
        raise RuntimeError("group= was given but torch.distributed is not initialised; call init_process_group first")
    world = dist.get_world_size(group)
    error: Exception | None = None
    fields = {"local_error": 0, "B": -1, "H": -1, "N": -1, "M": -1, "d": -1, "dv": -1, "ndim": -1, "dtype": -1,
              "mode": MODES.index(mode) if mode in MODES else -1,
              "strategy": _STRATEGY_NAMES.index(strategy) if strategy in _STRATEGY_NAMES else -1 if strategy else -2,
              "scale": -1, "concat_weight": int(concat_weight is not None)}
    try:
        inputs, added_heads = check_op_inputs(theta, phi, g, mode, scale, concat_weight, backend)
        chosen = _check_strategy(mode, strategy, inputs.theta.shape[1], world, backend)
        b, h, n, d = inputs.theta.shape
        fields.update(B=b, H=h, N=n, M=inputs.phi.shape[2], d=d, dv=inputs.g.shape[-1], ndim=theta.dim(),
                      dtype=dtype_code(inputs.theta), scale=float_code(inputs.scale))
    except (ValueError, TypeError) as exc:
        error = exc
        fields["local_error"] = 1
    device = theta.device if isinstance(theta, Tensor) and theta.device.type != "meta" else torch.device("cpu")
    values = exchange_metadata(group, fields, device)
    if error is not None:
        raise error
    failed = [r for r, e in enumerate(values["local_error"]) if e]
    if failed:
        raise ValueError(f"rank(s) {failed} of the sequence-parallel group rejected their inputs (see their error)")
    raise_on_mismatch(values, free=("N", "M"), what="nonlocal_op")
    y = STRATEGIES[chosen](inputs, group, values["N"], values["M"], backend)
    return y.squeeze(1) if added_heads else y
