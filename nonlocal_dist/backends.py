"""Backends of the non-local operation behind one dispatcher (xformers-style), for every path.

Each backend declares what it supports and returns ``not_supported_reasons(inputs)``; a backend
wrapping another library also asks that library whether it can run *these* inputs
(``runtime_reasons``). Two questions, one set of declarations:

- ``dispatch`` (one device; also the all-gather and Ulysses strategies, which run the op on gathered
  keys or on a shard of the heads) picks the first backend of ``AUTO_ORDER[device type]`` that can
  run the inputs and that no measured rule declines (``auto_declines``), saying once why it skipped
  a backend that is installed but cannot run.
- ``select_block_kernel`` (the ring, which merges key blocks) names the per-block kernel: a forward
  that returns the log-sum-exp and a backward from a global output and LSE
  (``kernels.softmax.LSE_KERNELS``). Only ``sdpa`` (torch's private LSE-returning ops, each tried
  once per process: ``kernels.softmax.working``) and ``blocked`` have one.

``backend=`` forces one; when the forced one (or every one) cannot run, the ``ValueError`` lists the
reasons, and names the strategy that asked. The rules every path shares: heads wider than 256 and
float64 on CUDA have no fused kernel (``sdpa`` declines them, ``auto`` runs ``blocked``); non-finite
CPU inputs run the blocked kernel inside ``sdpa`` (``kernels.softmax.nonfinite_on_cpu``).
"""
from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from nonlocal_dist.conventions import FLOAT_DTYPES, HALF_DTYPES, MODES, SOFTMAX_MODES
from nonlocal_dist.kernels import (
    blocked_attention,
    concat_sorted,
    dot_product_linear,
    reference_nonlocal,
    sdpa_attention,
)
from nonlocal_dist.kernels.softmax import FUSED_MAX_HEAD, fused_head_size, working

# CUDA launches put the batch on a grid axis limited to 65535 blocks.
CUDA_MAX_BATCH = 65535
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
    # Why a strategy that merges key blocks (the ring) cannot run this backend; None: it can.
    no_block_kernel: str | None = (
        "it has no per-block kernel (a forward returning the log-sum-exp, a backward from a global one)"
    )

    def declared_reasons(self, inputs: OpInputs) -> list[str]:
        """Why the declarations (modes, devices, dtypes) exclude ``inputs``; empty if they do not."""
        reasons = []
        if inputs.mode not in self.modes:
            reasons.append(f"mode {inputs.mode!r} not supported (supports {', '.join(self.modes)})")
        if inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type!r} not supported (supports {', '.join(self.devices)})")
        if inputs.dtype not in self.dtypes:
            reasons.append(f"dtype {inputs.dtype} not supported")
        return reasons

    def runtime_reasons(self, inputs: OpInputs) -> list[str]:
        """Why the wrapped library, asked at run time, cannot run ``inputs`` (installed but unable)."""
        return []

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        return self.declared_reasons(inputs) or self.runtime_reasons(inputs)

    def auto_declines(self, inputs: OpInputs) -> str | None:
        """Why ``auto`` passes over this backend although it can run ``inputs`` (a measured rule)."""
        return None

    def max_batch(self, inputs: OpInputs) -> int | None:
        """Largest batch one call accepts; larger batches are split (exactly) by ``dispatch``."""
        return None

    def max_queries(self, inputs: OpInputs) -> int | None:
        """Most query positions one call accepts; more are split (exactly) by ``dispatch``."""
        return None

    def compute(self, inputs: OpInputs) -> Tensor:
        raise NotImplementedError

    def block_kernel(self, inputs: OpInputs) -> str:
        """The per-block kernel (``kernels.softmax.LSE_KERNELS``) for ``inputs``; only where
        ``no_block_kernel`` is None and ``not_supported_reasons`` is empty."""
        raise NotImplementedError


# Softmax modes with wide heads (d or dv > 256) on CUDA: at most this many scores B·H·N·M, the
# materialised form is the cheapest exact path. Source: issue 10, H200, bf16: the I3D res4 block
# (B·H·N·M = 8 · 1568 · 392 = 4.9M, d = 512) took 3.40 ms fwd+bwd materialised against 5.36 ms for
# the fused fallback; the bound is twice that size, where the blocked path still holds one block.
MATERIALISE_MAX_SCORES = 2**23


class ReferenceBackend(Backend):
    """The materialised (N, M) affinity: the oracle; ``auto`` takes it only for small wide heads."""

    name = "reference"

    def auto_declines(self, inputs: OpInputs) -> str | None:
        b, h, n, d = inputs.theta.shape
        scores = b * h * n * inputs.phi.shape[-2]
        wide = max(d, inputs.g.shape[-1]) > FUSED_MAX_HEAD
        if inputs.mode in SOFTMAX_MODES and inputs.device.type == "cuda" and wide and scores <= MATERIALISE_MAX_SCORES:
            return None
        return "the materialised affinity is the cheapest path only for small wide-head softmax inputs on CUDA"

    def compute(self, inputs: OpInputs) -> Tensor:
        return reference_nonlocal(inputs.theta, inputs.phi, inputs.g, inputs.mode, inputs.scale, inputs.concat_weight)


def _flash_ok(q: Tensor, head: int) -> bool:
    if q.dtype not in HALF_DTYPES or not torch.backends.cuda.is_flash_attention_available():
        return False
    capability = torch.cuda.get_device_capability(q.device)
    # sm86/sm89 have no flash backward past head size 192 (torch's own SDPA checks the same).
    return capability >= (8, 0) and not (capability in ((8, 6), (8, 9)) and head > 192)


class SdpaBackend(Backend):
    """torch's fused attention. One device: the public ``F.scaled_dot_product_attention`` (torch picks
    CPU flash, or cuDNN, flash or memory-efficient on CUDA). Per-block kernels of the ring: the
    private LSE-returning ops (CUDA flash for half precision on sm80+, memory-efficient otherwise;
    CPU flash), each tried once per process (``kernels.softmax.working``). Heads up to 256 wide, no
    float64 on CUDA."""

    name = "sdpa"
    modes = SOFTMAX_MODES
    no_block_kernel = None

    def declared_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = super().declared_reasons(inputs)
        head = max(inputs.theta.shape[-1], inputs.g.shape[-1])
        if head > FUSED_MAX_HEAD:
            reasons.append(f"head size {head} > {FUSED_MAX_HEAD}: torch's fused kernels have no fused backward there "
                           "(backend='blocked' runs any width)")
        if inputs.device.type == "cuda" and inputs.dtype == torch.float64:
            reasons.append("float64 on CUDA has no fused kernel (torch would materialise the affinity; "
                           "backend='blocked' runs it)")
        return reasons

    def max_batch(self, inputs: OpInputs) -> int | None:
        return CUDA_MAX_BATCH if inputs.device.type == "cuda" else None

    def max_queries(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_QUERIES if inputs.device.type == "cuda" else None

    def compute(self, inputs: OpInputs) -> Tensor:
        return sdpa_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale)

    def block_kernel(self, inputs: OpInputs) -> str:
        q = inputs.theta
        if q.device.type == "cpu":
            kernel = "cpu_flash"
        else:
            kernel = "flash" if _flash_ok(q, fused_head_size(q, inputs.g)) else "efficient"
        return kernel if working(kernel, q.device, q.dtype) else "blocked"


class BlockedBackend(Backend):
    """Query blocks against all keys, the softmax materialised per block in float32 and recomputed in
    backward; any head width, any float dtype and device (``kernels.blocked_softmax``)."""

    name = "blocked"
    modes = SOFTMAX_MODES
    no_block_kernel = None

    def compute(self, inputs: OpInputs) -> Tensor:
        return blocked_attention(inputs.theta, inputs.phi, inputs.g, inputs.scale)

    def block_kernel(self, inputs: OpInputs) -> str:
        return "blocked"


@lru_cache(maxsize=1)
def load_xformers_fmha() -> tuple[ModuleType | None, str | None]:
    """xformers' attention package and ``None``, or ``None`` and why it cannot be imported."""
    try:
        return importlib.import_module("xformers.ops.fmha"), None
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "xformers":
            return None, "xformers is not installed (pip install 'nonlocal-dist[xformers]')"
        return None, f"xformers failed to import: {exc}"
    except Exception as exc:  # a broken install must not break dispatch
        return None, f"xformers failed to import: {exc}"


def _ask(dispatcher, xinputs, extra) -> None:
    # Older xformers dispatchers take the inputs alone, newer ones one more argument.
    dispatcher(xinputs, *([extra] if len(inspect.signature(dispatcher).parameters) > 1 else []))


def _xformers_layout(inputs: OpInputs) -> tuple[Tensor, Tensor, Tensor]:
    # xformers takes (B, M, H, K) and allows a value head size different from the key's.
    return tuple(t.transpose(1, 2) for t in (inputs.theta, inputs.phi, inputs.g))


class XformersBackend(Backend):
    """xformers' memory-efficient attention; xformers' own dispatcher decides whether it can run."""

    name = "xformers"
    modes = SOFTMAX_MODES
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def declared_reasons(self, inputs: OpInputs) -> list[str]:
        reasons = super().declared_reasons(inputs)
        _, error = load_xformers_fmha()
        return reasons + ([error] if error else [])

    def runtime_reasons(self, inputs: OpInputs) -> list[str]:
        # A wheel built for another torch or CUDA imports but its operators did not load: only its
        # dispatcher knows, and it raises NotImplementedError listing every operator's reasons.
        fmha, _ = load_xformers_fmha()
        q, k, v = _xformers_layout(inputs)
        xinputs = fmha.Inputs(query=q, key=k, value=v, attn_bias=None, p=0.0, scale=inputs.scale)
        needs_gradient = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        try:
            _ask(fmha.dispatch._dispatch_fw, xinputs, needs_gradient)
            if needs_gradient:
                _ask(fmha.dispatch._dispatch_bw, xinputs, None)  # varlen_lse_packed: no variable lengths
        except NotImplementedError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            return ["xformers has no operator for these inputs: " + " ".join(lines)]
        return []

    def max_batch(self, inputs: OpInputs) -> int | None:
        return CUDA_MAX_BATCH

    def max_queries(self, inputs: OpInputs) -> int | None:
        return _CUDA_MAX_QUERIES

    def compute(self, inputs: OpInputs) -> Tensor:
        import xformers.ops as xops

        q, k, v = _xformers_layout(inputs)
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
    b.name: b
    for b in (XformersBackend(), SdpaBackend(), BlockedBackend(), LinearBackend(), SortedBackend(), ReferenceBackend())
}
# What ``auto`` tries, in order, per device type: the one home of the preference. Source: issue 10
# (H200, torch 2.11, bf16): torch's fused kernels ran softmax modes at the floor (0.98-1.04x bare
# F.scaled_dot_product_attention) while xformers could not be timed (its operators did not load),
# so sdpa comes before xformers; wide heads, which sdpa declines, go to blocked (16.5 ms against
# 122 ms for the fused fallback at d = 512, N = M = 25088), small wide heads to the materialised form
# (``MATERIALISE_MAX_SCORES``). ``scripts/benchmark.py --device cuda`` prints every row again.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("reference", "sdpa", "blocked", "xformers", "linear", "sorted"),
    "cpu": ("sdpa", "blocked", "linear", "sorted"),
}
BACKEND_NAMES = ("auto", *BACKENDS)
_SAID: set[tuple[str, str]] = set()


def _say_once(name: str, reasons: list[str]) -> None:
    text = "; ".join(reasons)
    if (name, text) not in _SAID:
        _SAID.add((name, text))
        warnings.warn(f"backend='auto' skips {name}: {text}", RuntimeWarning, stacklevel=4)


def _auto_order(device_type: str) -> tuple[str, ...]:
    listed = AUTO_ORDER.get(device_type, AUTO_ORDER["cpu"])
    return listed + tuple(name for name in BACKENDS if name not in listed and name != "reference")


def select_backend(inputs: OpInputs, backend: str = "auto", strategy: str | None = None) -> Backend:
    """The backend that will run ``inputs``; raises ``ValueError`` listing every reason otherwise
    (naming ``strategy``, the sequence-parallel strategy that runs the backend, if given)."""
    if backend != "auto":
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(inputs)
        if not reasons:
            return chosen
        able = [b.name for b in BACKENDS.values() if not b.not_supported_reasons(inputs)]
        where = f"strategy {strategy!r}: " if strategy else ""
        raise ValueError(
            f"{where}backend={backend!r} cannot run these inputs: {'; '.join(reasons)}. "
            f"Backends that can: {', '.join(able) or 'none'} (or backend='auto')."
        )
    for name in _auto_order(inputs.device.type):
        candidate = BACKENDS[name]
        if candidate.declared_reasons(inputs) or candidate.auto_declines(inputs) is not None:
            continue
        runtime = candidate.runtime_reasons(inputs)
        if runtime:
            _say_once(name, runtime)
            continue
        return candidate
    details = "; ".join(f"{b.name}: {', '.join(b.not_supported_reasons(inputs))}" for b in BACKENDS.values())
    raise ValueError(
        f"no backend can run mode={inputs.mode!r} on {inputs.device.type} with {inputs.dtype}: {details}"
    )


def _block_kernel_reasons(backend: Backend, inputs: OpInputs) -> list[str]:
    reasons = backend.not_supported_reasons(inputs)
    return reasons + ([backend.no_block_kernel] if backend.no_block_kernel else [])


def select_block_kernel(inputs: OpInputs, backend: str = "auto", strategy: str = "ring") -> str:
    """The per-block kernel (``kernels.softmax.LSE_KERNELS``) of a strategy that merges key blocks.

    ``auto``: the fused kernel of ``sdpa`` where it can run ``inputs``, else ``blocked``; a fused
    kernel whose private ops fail on this torch is replaced by ``blocked`` (``kernels.softmax.working``).
    A forced backend without a per-block kernel, or one that cannot run ``inputs``, raises
    ``ValueError`` naming ``strategy``, the backend and the reasons. ``inputs``: this rank's blocks
    (B, H, L, d).
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    chosen = BACKENDS["blocked" if BACKENDS["sdpa"].not_supported_reasons(inputs) else "sdpa"] if backend == "auto" \
        else BACKENDS[backend]
    reasons = _block_kernel_reasons(chosen, inputs)
    if reasons:
        able = [b.name for b in BACKENDS.values() if not _block_kernel_reasons(b, inputs)]
        raise ValueError(
            f"strategy {strategy!r} cannot run backend={backend!r} ({chosen.name}): {'; '.join(reasons)}. "
            f"Backends it can run here: {', '.join(['auto', *able])} (strategy='allgather' runs any backend on "
            "the gathered keys)."
        )
    return chosen.block_kernel(inputs)


def block_kernel_if_any(inputs: OpInputs, backend: str = "auto") -> str | None:
    """The per-block kernel of ``backend`` for ``inputs``, or None where it has none; ``auto`` gives
    ``sdpa``'s kernel, or None where ``sdpa`` cannot run ``inputs`` (heads wider than 256): a
    strategy that can also run a backend whole, Ulysses, then keeps the single-device dispatch's
    own choice."""
    chosen = BACKENDS["sdpa" if backend == "auto" else backend]
    return None if _block_kernel_reasons(chosen, inputs) else chosen.block_kernel(inputs)


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
