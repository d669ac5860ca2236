"""Index plans of ``F.interpolate`` and ``F.pad`` along one dim, reproducing ATen's CPU arithmetic.

When an activation is sharded along a dim, each rank computes its slice of ``F.interpolate(x)`` or
``F.pad(x)`` from GLOBAL input positions. The plans here say, for every output position ``o`` of one
dim, which global input positions it reads:

* ``interpolate_sources`` -> ``(i0, i1, w1)``, each of shape ``(out_len,)``, with
  ``out[o] = x[i0[o]] * (1 - w1[o]) + x[i1[o]] * w1[o]`` along that dim (``w1 = 0`` and ``i1 = i0``
  for the nearest modes). The multi-dim modes (bilinear, trilinear) are separable: apply the plan of
  each spatial dim in turn, the LAST dim first, which is the order in which ATen's kernel blends.
* ``pad_sources`` -> the source index of every padded position (``-1`` for a constant fill).

Which ATen arithmetic is reproduced (CPU kernels, checked against torch 2.13 on x86-64):

* The ratio is ``area_pixel_compute_scale``: with ``align_corners=True`` it is
  ``(in_len - 1) / (out_len - 1)`` (0 when ``out_len == 1``); otherwise ``1 / scale`` when the kernel
  receives a scale (``F.interpolate(scale_factor=...)`` without ``recompute_scale_factor=True``) and
  ``in_len / out_len`` when it does not. Both are computed in the opmath type of the input dtype:
  float64 for float64 inputs, float32 for float32/float16/bfloat16 inputs (``dtype=`` argument).
* linear: ``src = ratio * o`` (align_corners) or ``max(ratio * (o + 0.5) - 0.5, 0)``;
  ``i0 = min(floorf(src), in_len - 1)``, ``w1 = clamp(src - i0, 0, 1)``,
  ``i1 = min(i0 + 1, in_len - 1)``; ``in_len == out_len`` is the identity whatever the scale.
  ``floorf`` takes a float: ATen rounds ``src`` to float32 before flooring EVEN FOR FLOAT64 INPUTS,
  so when ``src`` lies within half a float32 ulp below an integer ``n`` (long dims, e.g. a few
  thousand positions) the index is ``n`` and the weight 0, not ``n - 1`` and a weight near 1. The
  plan reproduces this.
* nearest / nearest-exact, 1-D and 3-D calls (the generic CPU kernel, opmath ratio):
  nearest ``i = min(floorf(ratio * o), in_len - 1)``; nearest-exact
  ``i = min(floorf(max(ratio * (o + 0.5) - 0.5, 0) + 0.5), in_len - 1)``.
* nearest / nearest-exact, 2-D calls (``upsample_nearest2d`` uses ATen's ``nearest_idx`` /
  ``nearest_exact_idx`` for every dtype and memory format): a float32 ratio whatever the dtype;
  nearest ``i = o`` when ``out_len == in_len``, ``o >> 1`` when ``out_len == 2 * in_len``, else
  ``min(floorf(o * ratio), in_len - 1)``; nearest-exact ``min(floorf((o + 0.5) * ratio), in_len - 1)``.
  These differ from the generic kernel's indices for some sizes (e.g. nearest 14 -> 46 in float64,
  nearest 2 -> 2 with ``scale_factor=1.1``), so pass ``spatial_dims=`` for the nearest modes.
* ``ratio * (o + 0.5) - 0.5`` is one fused multiply-add in ATen's AVX2/AVX-512 (and aarch64)
  builds and two roundings in the x86 DEFAULT build (``ATEN_CPU_CAPABILITY=default``). For float64
  this moves ``w1`` by about one ulp of ``src``; for float32 it can move an index (nearest-exact
  2 -> 41, ``o = 20``: 1 fused, 0 unfused). ``fused=None`` detects what this process runs.

Not reproduced: CUDA kernels. From ATen's CUDA sources they use a float32 ratio for the nearest modes
for every dtype, nearest-exact as ``floorf((o + 0.5f) * ratio)``, and truncate ``src`` in the opmath
type for linear (no float32 rounding); plans for a CUDA run can therefore differ in the same rare
cases as above.
"""
from __future__ import annotations

import platform

import torch
from torch import Tensor

__all__ = [
    "aten_cpu_fuses_multiply_add",
    "interpolate_output_size",
    "interpolate_sources",
    "pad_sources",
]

_LINEAR_MODES = ("linear", "bilinear", "trilinear")
_NEAREST_MODES = ("nearest", "nearest-exact")
_PAD_MODES = ("constant", "reflect", "replicate", "circular")


def aten_cpu_fuses_multiply_add() -> bool:
    """Whether ATen's CPU upsample kernels in this process compute ``a * b - c`` with one rounding.

    True for the AVX2/AVX-512 kernels on x86-64 and on other architectures (where compilers contract
    ``a * b - c`` into an FMA by default); False for the x86 DEFAULT kernels
    (``ATEN_CPU_CAPABILITY=default`` or a CPU without AVX2).
    """
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        return torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return True


def interpolate_output_size(
    in_len: int,
    size: int | None,
    scale_factor: float | None,
    recompute_scale_factor: bool | None,
) -> tuple[int, float | None]:
    """``(out_len, scale_for_kernel)`` of one spatial dim, as ``F.interpolate`` computes them.

    ``size`` given: ``(size, None)`` (``recompute_scale_factor=True`` with a size is an error, as in
    ``F.interpolate``). ``scale_factor`` given: ``out_len = int(in_len * scale_factor)`` (truncation of
    the float64 product, as both the Python and the C++ side do); the kernel then receives
    ``scale_factor`` unless ``recompute_scale_factor`` is True, in which case it receives None and
    uses ``in_len / out_len``. ``scale_for_kernel`` is what ``interpolate_sources`` takes as ``scale``.
    (``mode="area"`` always recomputes; it is not planned here.)
    """
    if size is not None and scale_factor is not None:
        raise ValueError("only one of size or scale_factor should be defined")
    if size is None and scale_factor is None:
        raise ValueError("either size or scale_factor should be defined")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
        out_len, kernel_scale = int(size), None
    else:
        out_len = int(in_len * float(scale_factor))
        kernel_scale = None if recompute_scale_factor else float(scale_factor)
    if in_len < 1 or out_len < 1:
        raise ValueError(
            f"interpolate needs input and output sizes greater than 0, got input {in_len} and "
            f"output {out_len} (size={size}, scale_factor={scale_factor})"
        )
    return out_len, kernel_scale


def _opmath(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise ValueError(f"interpolate plans are for floating inputs (float64, float32, float16, bfloat16), got {dtype}")


def _round(value: float, opmath: torch.dtype) -> float:
    """A Python float rounded to ``opmath`` (round to nearest even), returned exactly."""
    return torch.tensor(value, dtype=torch.float64).to(opmath).item()


def _kernel_ratio(in_len: int, out_len: int, align_corners: bool, scale: float | None, opmath: torch.dtype) -> float:
    """``area_pixel_compute_scale<opmath>``: the opmath value, held exactly in a Python float."""
    if align_corners:
        if out_len <= 1:
            return 0.0
        num, den = in_len - 1, out_len - 1
    elif scale is not None and scale > 0.0:
        return _round(1.0 / scale, opmath)
    else:
        num, den = in_len, out_len
    if opmath == torch.float64:
        return num / den
    return (torch.tensor(float(num), dtype=torch.float32) / float(den)).item()


def _half_pixel_source(ratio: float, out_len: int, opmath: torch.dtype, fused: bool) -> Tensor:
    """``ratio * (o + 0.5) - 0.5`` for o in [0, out_len), in opmath, unclamped; float64 holding it.

    ``fused``: one rounding (FMA), else two. Exact in both cases: float64 FMA with Python integers
    (``ratio = m / d``, so the value is ``(m * (2o + 1) - d) / (2d)``, and int / int is correctly
    rounded); float32 through float64, where the product and the difference are exact.
    """
    o = torch.arange(out_len, dtype=torch.float64)
    if opmath == torch.float64:
        if fused:
            m, d = ratio.as_integer_ratio()
            return torch.tensor([(m * (2 * k + 1) - d) / (2 * d) for k in range(out_len)], dtype=torch.float64)
        return ratio * (o + 0.5) - 0.5
    if fused:
        return (ratio * (o + 0.5) - 0.5).to(torch.float32).double()
    r = torch.tensor(ratio, dtype=torch.float32)
    return (r * (o.float() + 0.5) - 0.5).double()


def _floorf(src: Tensor) -> Tensor:
    """``(int64_t) floorf(src)``: C's floorf takes a float, so ``src`` is first rounded to float32."""
    return src.to(torch.float32).floor().to(torch.int64)


def interpolate_sources(
    in_len: int,
    out_len: int,
    mode: str,
    align_corners: bool | None,
    scale: float | None,
    *,
    dtype: torch.dtype = torch.float64,
    spatial_dims: int | None = None,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Global sources of each output position of one dim of ``F.interpolate``.

    Returns ``(i0, i1, w1)``: int64 tensors of shape ``(out_len,)`` and a float64 tensor of shape
    ``(out_len,)`` with ``out[o] = x[i0[o]] * (1 - w1[o]) + x[i1[o]] * w1[o]`` along the dim.

    ``mode``: "nearest", "nearest-exact" (``w1 = 0``, ``i1 = i0``) or "linear" ("bilinear" and
    "trilinear" are accepted as names of the same per-dim factor). ``align_corners``: as given to
    ``F.interpolate`` (None means False; True is an error for the nearest modes). ``scale``: the
    scale the kernel receives for this dim (``interpolate_output_size``'s second result): None
    means the ratio ``in_len / out_len``, a positive value ``1 / scale``. ``dtype``: the input's
    dtype (float64 computes in float64, the others in float32; for float16/bfloat16 ``w1`` is
    rounded to that dtype as ATen stores it). ``spatial_dims``: the number of spatial dims of the
    ``F.interpolate`` call (1, 2 or 3); only the nearest modes depend on it (2 selects
    ``nearest_idx``, see the module docstring); None means the 1-D/3-D kernel. ``fused``: whether
    the kernel fuses ``ratio * (o + 0.5) - 0.5`` into an FMA (None: this process's kernels, see
    ``aten_cpu_fuses_multiply_add``). Formulas: module docstring.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"interpolate needs input and output sizes greater than 0, got {in_len} -> {out_len}")
    if spatial_dims not in (None, 1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3 (the spatial dims of the F.interpolate call), got {spatial_dims}")
    opmath = _opmath(dtype)
    if fused is None:
        fused = aten_cpu_fuses_multiply_add()
    o = torch.arange(out_len, dtype=torch.int64)

    if mode in _NEAREST_MODES:
        if align_corners:
            raise ValueError(f"align_corners=True is only for the interpolating modes, not mode={mode!r}")
        if spatial_dims == 2:
            idx = _nearest_idx(in_len, out_len, mode, scale)
        else:
            ratio = _kernel_ratio(in_len, out_len, False, scale, opmath)
            if mode == "nearest":
                src = (ratio * o.double()).to(opmath).double()
            else:
                src = _half_pixel_source(ratio, out_len, opmath, fused).clamp_min(0.0)
                src = (src.to(opmath) + 0.5).double()
            idx = _floorf(src).clamp_max(in_len - 1)
        return idx, idx.clone(), torch.zeros(out_len, dtype=torch.float64)

    if mode not in _LINEAR_MODES:
        raise ValueError(f"mode must be one of {_NEAREST_MODES + _LINEAR_MODES}, got {mode!r}")
    if in_len == out_len:  # compute_source_index_and_lambda: the identity, whatever the scale
        return o, o.clone(), torch.zeros(out_len, dtype=torch.float64)
    align = bool(align_corners)
    ratio = _kernel_ratio(in_len, out_len, align, scale, opmath)
    if align:
        src = (ratio * o.double()).to(opmath).double()
    else:
        src = _half_pixel_source(ratio, out_len, opmath, fused).clamp_min(0.0)
    i0 = _floorf(src).clamp_max(in_len - 1)
    # guard_index_and_lambda: lambda = min(max(src - i0, 0), 1) in opmath (exact for float32 too:
    # src and i0 are within a few units of each other).
    w1 = (src - i0.double()).to(opmath).clamp(0.0, 1.0).double()
    if dtype in (torch.float16, torch.bfloat16):
        w1 = w1.to(dtype).double()
    i1 = torch.where(i0 < in_len - 1, i0 + 1, i0)
    return i0, i1, w1


def _nearest_idx(in_len: int, out_len: int, mode: str, scale: float | None) -> Tensor:
    """ATen's ``nearest_idx`` / ``nearest_exact_idx`` (float32 ratio, any dtype): int64 (out_len,)."""
    ratio = _kernel_ratio(in_len, out_len, False, scale, torch.float32)
    o = torch.arange(out_len, dtype=torch.int64)
    if mode == "nearest":
        if out_len == in_len:
            return o
        if out_len == 2 * in_len:
            return o >> 1
        # floorf(o * scale): int64 * float is a float product.
        src = torch.tensor(ratio, dtype=torch.float32) * o.float()
    else:
        # floorf((o + 0.5) * scale): double * float is a double product (exact), then floorf.
        src = (o.double() + 0.5) * ratio
    return _floorf(src.double()).clamp_max(in_len - 1)


def pad_sources(length: int, left: int, right: int, mode: str) -> Tensor:
    """Source index of every position of one dim of ``F.pad(x, (..., left, right), mode=mode)``.

    Returns an int64 tensor of shape ``(left + length + right,)``: ``out[j] = x[src[j]]``, with
    ``src[j] = -1`` where "constant" fills. With ``p = j - left`` (position in input coordinates):

    * reflect: ``p`` reflected about the edges without repeating them (``-p`` below 0,
      ``2 (length - 1) - p`` above), needs ``left < length`` and ``right < length``;
    * replicate: ``clamp(p, 0, length - 1)``, needs ``length >= 1``;
    * circular: ``p mod length``, needs ``left <= length`` and ``right <= length``;
    * constant: ``p`` inside ``[0, length)``, else -1.

    Negative pads crop, as in ``F.pad``. For reflect/replicate/constant the positions keep the
    formulas above; circular crops first and wraps around the cropped range (F.pad's behaviour), so
    its positive pads must not exceed the cropped length. Raises ValueError where F.pad raises
    (also for a circular wrap longer than the cropped length, where F.pad fails internally, and for
    a crop longer than the dim).
    """
    if mode not in _PAD_MODES:
        raise ValueError(f"mode must be one of {_PAD_MODES}, got {mode!r}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    out_len = left + length + right
    if mode == "constant":
        if out_len < 0:
            raise ValueError(
                f"constant padding ({left}, {right}) crops more than the dim's length {length}: "
                f"expected left + length + right >= 0, got {out_len}"
            )
        p = torch.arange(out_len, dtype=torch.int64) - left
        return torch.where((p >= 0) & (p < length), p, torch.full_like(p, -1))

    if mode == "circular":
        start, stop = max(-left, 0), length - max(-right, 0)
        kept = stop - start
        if kept < 0:
            raise ValueError(
                f"circular padding ({left}, {right}) crops more than the dim's length {length}"
            )
        for side, pad in (("left", left), ("right", right)):
            if pad > kept:
                raise ValueError(
                    f"circular padding wraps around more than once: expected {side} pad <= {kept} "
                    f"(the dim's length {length} after cropping), got {side}={pad}"
                )
        n = kept + max(left, 0) + max(right, 0)
        if kept == 0:
            return torch.empty(0, dtype=torch.int64)
        j = torch.arange(n, dtype=torch.int64)
        return start + torch.remainder(j - max(left, 0), kept)

    if length < 1:
        raise ValueError(f"{mode} padding needs a non-empty dim, got length {length}")
    if mode == "reflect":
        for side, pad in (("left", left), ("right", right)):
            if pad >= length:
                raise ValueError(
                    f"reflect padding must be less than the dim's length: expected {side} pad < "
                    f"{length}, got {side}={pad}"
                )
    if out_len < 1:
        raise ValueError(
            f"{mode} padding ({left}, {right}) leaves no position of the dim's length {length}: "
            f"expected left + length + right >= 1, got {out_len}"
        )
    p = torch.arange(out_len, dtype=torch.int64) - left
    if mode == "replicate":
        return p.clamp(0, length - 1)
    p = p.abs()  # reflect: |pad| < length, so one reflection at each edge suffices
    return torch.where(p > length - 1, 2 * (length - 1) - p, p)
