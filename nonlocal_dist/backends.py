"""Backends of the non-local operation behind one dispatch point (xformers-style).

Each backend declares what it supports and returns ``not_supported_reasons(inputs)``; ``dispatch``
picks the first backend of ``AUTO_ORDER`` that fits, or the one forced with ``backend=``, and when
none fits raises an error listing every backend with its reasons.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

from nonlocal_dist.conventions import FLOAT_DTYPES, MODES, SOFTMAX_MODES
from nonlocal_dist.kernels import concat_sorted, dot_product_linear, reference_nonlocal, softmax_attention

# CUDA launches put the batch on a grid axis limited to 65535 blocks.
_CUDA_MAX_BATCH = 65535
# torch's CUDA memory-efficient kernel has been reported silently wrong past 2**16 positions with a
# mask (pytorch/pytorch#162588). We pass no mask, but 2**16 queries per call still fill the device,
# so the chunking costs nothing and keeps every call inside the sizes known to work.
_CUDA_MAX_QUERIES = 2**16


@dataclass(frozen=True)
class OpInputs:
    """Validated inputs: theta (B, H, N, d), phi (B, H, M, d), g (B, H, M, dv)."""

    theta: Tensor
    phi: Tensor
    g: Tensor
    mode: str
    scale: float
    concat_weight: Tensor | None

    @property
    def device(self) -> torch.device:
        return self.theta.device

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype


class Backend:
    """A way to compute the operation; subclasses fill in the declarations and ``compute``."""

    name: str = ""
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = []
        if inputs.mode not in self.modes:
            reasons.append(f"mode {inputs.mode!r} not supported (supports {', '.join(self.modes)})")
        if inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type!r} not supported (supports {', '.join(self.devices)})")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not supported")
        return reasons

    def max_batch(self, inputs: OpInputs) -> int | None:
        """Largest batch one call accepts; larger batches are split (exactly) by ``dispatch``."""
        return None

    def max_queries(self, inputs: OpInputs) -> int | None:
        """Most query positions one call accepts; more are split (exactly) by ``dispatch``."""
        return None

    def compute(self, inputs: OpInputs) -> Tensor:
        raise NotImplementedError


class ReferenceBackend(Backend):
    """The materialised (N, M) affinity: the oracle, never picked by ``auto``."""

    name = "reference"

    def compute(self, inputs: OpInputs) -> Tensor:
        return reference_nonlocal(inputs.theta, inputs.phi, inputs.g, inputs.mode, inputs.scale, inputs.concat_weight)


class SdpaBackend(Backend):
    """torch's fused attention: the CPU flash kernel (with LSE) or CUDA flash / memory-efficient."""

    name = "sdpa"
    modes = SOFTMAX_MODES

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        if inputs.device.type == "cuda" and inputs.dtype == torch.float64:
            reasons.append("float64 on CUDA has no fused kernel (torch would materialise the affinity)")
        return reasons

    def max_batch(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_BATCH if inputs.device.type == "cuda" else None

    def max_queries(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_QUERIES if inputs.device.type == "cuda" else None

    def compute(self, inputs: OpInputs) -> Tensor:
        return softmax_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale)


@lru_cache(maxsize=1)
def _xformers_import_error() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'nonlocal-dist[xformers]')"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a broken install must not break dispatch
        return f"xformers failed to import: {exc}"
    return None


class XformersBackend(Backend):
    """xformers' memory-efficient attention (CUDA only)."""

    name = "xformers"
    modes = SOFTMAX_MODES
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        error = _xformers_import_error()
        if error is not None:
            reasons.append(error)
        return reasons

    def max_batch(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_BATCH

    def max_queries(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_QUERIES

    def compute(self, inputs: OpInputs) -> Tensor:
        import xformers.ops as xops

        # xformers takes (B, M, H, K) and allows a value head size different from the key's.
        q, k, v = (t.transpose(1, 2) for t in (inputs.theta, inputs.phi, inputs.g))
        return xops.memory_efficient_attention(q, k, v, scale=inputs.scale).transpose(1, 2)


class LinearBackend(Backend):
    """Dot product by associativity: ``theta (phi^T g) / M``."""

    name = "linear"
    modes = ("dot_product",)

    def compute(self, inputs: OpInputs) -> Tensor:
        return dot_product_linear(inputs.theta, inputs.phi, inputs.g)


class SortedBackend(Backend):
    """Concatenation by sorting the keys and taking prefix sums."""

    name = "sorted"
    modes = ("concatenation",)

    def compute(self, inputs: OpInputs) -> Tensor:
        return concat_sorted(inputs.theta, inputs.phi, inputs.g, inputs.concat_weight)


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (XformersBackend(), SdpaBackend(), LinearBackend(), SortedBackend(), ReferenceBackend())
}
AUTO_ORDER = ("xformers", "sdpa", "linear", "sorted")
BACKEND_NAMES = ("auto", *BACKENDS)


def select_backend(inputs: OpInputs, backend: str = "auto") -> Backend:
    """The backend that will run ``inputs``; raises ``ValueError`` listing every reason otherwise."""
    if backend != "auto":
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(inputs)
        if not reasons:
            return chosen
        able = [b.name for b in BACKENDS.values() if not b.not_supported_reasons(inputs)]
        raise ValueError(
            f"backend={backend!r} cannot run these inputs: {'; '.join(reasons)}. "
            f"Backends that can: {', '.join(able) or 'none'} (or backend='auto')."
        )
    for name in AUTO_ORDER:
        if not BACKENDS[name].not_supported_reasons(inputs):
            return BACKENDS[name]
    details = "; ".join(f"{b.name}: {', '.join(b.not_supported_reasons(inputs))}" for b in BACKENDS.values())
    raise ValueError(
        f"no backend can run mode={inputs.mode!r} on {inputs.device.type} with {inputs.dtype}: {details}"
    )


def dispatch(inputs: OpInputs, backend: str = "auto") -> Tensor:
    """Run ``inputs`` on the selected backend, in chunks where the backend has a size limit."""
    return _compute_in_chunks(select_backend(inputs, backend), inputs)


def _compute_in_chunks(chosen: Backend, inputs: OpInputs) -> Tensor:
    # Batch entries and query positions are independent (each y_i sums over all keys), so splitting
    # either axis is exact; autograd sums the key gradients of the query chunks.
    for dim, limit in ((0, chosen.max_batch(inputs)), (2, chosen.max_queries(inputs))):
        size = inputs.theta.shape[dim]
        if limit is not None and size > limit:
            if dim == 0:
                parts = [replace(inputs, theta=t, phi=p, g=v) for t, p, v in
                         zip(*(x.split(limit) for x in (inputs.theta, inputs.phi, inputs.g)))]
            else:
                parts = [replace(inputs, theta=t) for t in inputs.theta.split(limit, dim=2)]
            return torch.cat([_compute_in_chunks(chosen, part) for part in parts], dim=dim)
    return chosen.compute(inputs)
