"""The rules every module shares, in one place: the modes of the paper and the precision policy.

Modes: ``gaussian`` and ``embedded_gaussian`` normalise by a softmax (C = Σ_j f); ``dot_product``
and ``concatenation`` by the number of keys (C = M).

Precision: inputs of mixed float dtypes (autocast leaves x in float32 while a Linear gives bf16)
are brought to one *compute dtype*; every sum over positions (softmax statistics, prefix sums,
BatchNorm statistics, LSE merges) runs in the *accumulation dtype*: float32 for half inputs,
float64 for float64, float32 otherwise.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SOFTMAX_MODES = ("gaussian", "embedded_gaussian")
MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else (half inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on ``device_type``, or None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """One dtype for tensors that meet in one operation.

    The widest floating dtype among them (``torch.promote_types``), where under ``torch.autocast``
    every tensor but a float64 one counts as the autocast dtype of its device (what a Linear
    gives: autocast leaves float64 alone).
    """
    present = [t for t in tensors if t is not None]
    cast = autocast_dtype(present[0].device.type)
    dtypes = [t.dtype if cast is None or t.dtype == torch.float64 else cast for t in present]
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def all_finite(*tensors: Tensor) -> bool:
    """True when every entry of every tensor is finite (a host sync on CUDA).

    A sum is NaN or inf whenever one of its terms is (a finite sum that overflows only sends the
    caller down its exact non-finite path), and it reads each tensor once without a mask: 5-10x
    cheaper than ``isfinite().all()``. Summed in the tensor's own dtype, float32 for float16 (whose
    range is short): ``sum(dtype=float64)`` first makes a float64 copy, twice a float32 input, and
    took 50x longer (80 vs 1.6 ms for 2 x 2 x 16384 x 64 float32, 1 thread).
    """
    return all(math.isfinite(t.detach().sum(dtype=torch.float32 if t.dtype == torch.float16 else None)) for t in tensors)


__all__ = [
    "FLOAT_DTYPES", "HALF_DTYPES", "MODES", "SOFTMAX_MODES", "accumulation_dtype", "all_finite", "autocast_dtype",
    "compute_dtype",
]
