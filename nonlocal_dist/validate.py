"""Boundary checks of ``nonlocal_op`` and the block's arguments: one place, messages that say expected,
given and the fix."""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

from torch import Tensor

from nonlocal_dist.backends import BACKEND_NAMES, OpInputs
from nonlocal_dist.conventions import MODES, SOFTMAX_MODES, compute_dtype


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1: Python or NumPy integers (anything with ``__index__``), never bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int (Python or NumPy integer), got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def one_of(name: str, value: object, options: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``options``; TypeError for a non-string."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, one of {', '.join(options)}; got {value!r} ({type(value).__name__})"
        )
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(options)}")
    return str(value)


def _check_scale(scale: object, mode: str) -> float:
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (1.0, the paper), got {scale!r}")
    if mode not in SOFTMAX_MODES and scale != 1.0:
        raise ValueError(f"scale applies to the softmax modes only; mode {mode!r} normalises by M. Drop scale=.")
    return float(scale)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; convert it with .float()")
    return t


def check_op_inputs(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    mode: str,
    scale: float | None,
    concat_weight: Tensor | None,
    backend: str,
    *,
    allow_empty_positions: bool = False,
) -> tuple[OpInputs, bool]:
    """Validate and lift to 4-D ``(B, H, L, d)``; returns the inputs and whether a heads axis was added.

    Mixed float dtypes are brought to one ``conventions.compute_dtype`` here, the one place that does
    it (under ``torch.autocast`` theta = phi = x stay float32 in gaussian mode while g is bf16).
    ``allow_empty_positions``: N or M may be 0 (an empty sequence-parallel shard); channels never.
    """
    mode, backend = one_of("mode", mode, MODES), one_of("backend", backend, BACKEND_NAMES)
    tensors = {"theta": _check_tensor("theta", theta), "phi": _check_tensor("phi", phi), "g": _check_tensor("g", g)}
    ranks = {name: t.dim() for name, t in tensors.items()}
    if set(ranks.values()) - {3, 4} or len(set(ranks.values())) != 1:
        raise ValueError(
            "theta, phi, g must all be (B, N, d) or all (B, H, N, d); "
            f"got ranks {ranks} with shapes {', '.join(f'{n}={tuple(t.shape)}' for n, t in tensors.items())}"
        )
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"theta, phi, g must be on one device, got {devices}; move them with .to(device)")
    dtype = compute_dtype(theta, phi, g)
    theta, phi, g = (t if t.dtype == dtype else t.to(dtype) for t in (theta, phi, g))
    added_heads = theta.dim() == 3
    if added_heads:
        theta, phi, g = theta.unsqueeze(1), phi.unsqueeze(1), g.unsqueeze(1)
    shapes = f"theta {tuple(theta.shape)}, phi {tuple(phi.shape)}, g {tuple(g.shape)}"
    if not theta.shape[:2] == phi.shape[:2] == g.shape[:2]:
        raise ValueError(f"batch (and heads) sizes must match: {shapes}")
    if theta.shape[-1] != phi.shape[-1]:
        raise ValueError(f"theta and phi must have the same channel size d: {shapes}")
    if phi.shape[-2] != g.shape[-2]:
        raise ValueError(f"phi and g must have the same number of key positions M: {shapes}")
    if min(theta.shape[-1], g.shape[-1]) == 0:
        raise ValueError(f"channels must be non-empty: {shapes}")
    if not allow_empty_positions and min(theta.shape[-2], phi.shape[-2]) == 0:
        raise ValueError(f"positions must be non-empty (N, M >= 1): {shapes}; pass at least one query and one key")
    scale = _check_scale(scale, mode)
    concat_weight = _check_concat_weight(concat_weight, mode, theta)
    return OpInputs(theta, phi, g, mode, scale, concat_weight), added_heads


def _check_concat_weight(concat_weight: Tensor | None, mode: str, theta: Tensor) -> Tensor | None:
    if mode != "concatenation":
        if concat_weight is not None:
            raise ValueError(f"concat_weight is only used by mode='concatenation', got mode {mode!r}")
        return None
    heads, d = theta.shape[1], theta.shape[-1]
    if concat_weight is None:
        raise ValueError(f"mode='concatenation' needs concat_weight = [w_theta, w_phi] of shape ({2 * d},)")
    if not isinstance(concat_weight, Tensor) or not concat_weight.is_floating_point():
        given = f"a {concat_weight.dtype} tensor" if isinstance(concat_weight, Tensor) else type(concat_weight).__name__
        raise TypeError(
            f"concat_weight must be a floating-point torch.Tensor, got {given}; e.g. torch.as_tensor(w, dtype=torch.float32)"
        )
    if tuple(concat_weight.shape) not in ((2 * d,), (heads, 2 * d)):
        raise ValueError(
            f"concat_weight must have shape ({2 * d},) or ({heads}, {2 * d}) for d={d}, heads={heads}; "
            f"got {tuple(concat_weight.shape)}"
        )
    if concat_weight.device != theta.device:
        raise ValueError(f"concat_weight is on {concat_weight.device} but theta on {theta.device}")
    return concat_weight
