"""Every path against its floor on one device (issue 10): ``scripts/benchmark.py --device cuda``.

Rows, each forward and forward+backward with the device's peak memory:
  softmax d <= 256   nonlocal_op (auto) against bare F.scaled_dot_product_attention and the
                     materialised formula;
  wide heads         d = 512 (N = M = 25088), d = 320 (12544), d = 1024 (1568, B = 8): auto, the
                     blocked path, bare SDPA (torch's fallback) and the materialised formula;
  other modes        dot product (linear) and concatenation (sorted) against the materialised formula;
  ring               the P-rank ring schedule in one process (local_ring_attention, P = 4 blocks of
                     8192, B = 2, H = 4, d = 64) against one flash call on the whole sequence;
  block              NonLocalBlock at I3D res4 (x (8, 1024, 8, 14, 14), sub_sample) and res3
                     (x (4, 512, 16, 28, 28)) under autocast against a plain block in a few lines
                     (1x1x1 convs, max pool, SDPA, BatchNorm).

CUDA: times from CUDA events (minimum over --repeats), memory from torch.cuda.max_memory_allocated
beyond what was allocated before. CPU (``--device cpu --quick``): wall clock and the allocator
peak of bench_utils, to prove the code runs; ``--quick`` divides every size.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from bench_utils import peak_memory_mb, print_table
from torch import nn

from nonlocal_dist import NonLocalBlock, nonlocal_op
from nonlocal_dist.backends import BACKENDS
from nonlocal_dist.sequence.ring import local_ring_attention
from nonlocal_dist.validate import check_op_inputs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Timer:
    """Minimum time (ms) and peak memory (MiB) of a callable on one device."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def ms(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up: kernels chosen, caches filled
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return min(times)

    def peak_mib(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            return peak_memory_mb(fn)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20

    def measure(self, forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> dict:
        """fwd ms, fwd+bwd ms and peak MiB of fwd+bwd; ``forward()`` uses ``inputs`` (requiring grad)."""
        def fwd():
            with torch.no_grad():
                forward()

        def fwd_bwd():
            y = forward()
            torch.autograd.grad(y, inputs, torch.ones_like(y))

        try:
            return {"fwd_ms": self.ms(fwd), "fwd_bwd_ms": self.ms(fwd_bwd), "peak_mib": self.peak_mib(fwd_bwd)}
        except (RuntimeError, TypeError, ValueError) as exc:  # out of memory included: the row says so
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}


def _shrink(n: int, quick: bool, factor: int = 32, floor: int = 64) -> int:
    return max(n // factor, floor) if quick else n


def _qkv(b, h, n, m, d, dv, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = ((b, h, n, d), (b, h, m, d), (b, h, m, dv))
    return [torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_() for s in shapes]


def _ratio(m: dict, base: dict, inverse: bool = False) -> str:
    if "error" in m or "error" in base:
        return "-"
    ratio = base["fwd_bwd_ms"] / m["fwd_bwd_ms"] if inverse else m["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return f"{ratio:.2f}x"


def _cells(m: dict) -> list:
    """fwd ms, fwd+bwd ms, peak MiB; or the error in the first cell."""
    return [m["error"], "-", "-"] if "error" in m else [m["fwd_ms"], m["fwd_bwd_ms"], m["peak_mib"]]


def _rows_against_floor(case: str, impls: dict[str, dict], floor: str, flops: float, rows: list, records: list) -> None:
    for impl, m in impls.items():
        tflops = "-" if "error" in m else f"{flops / m['fwd_ms'] / 1e9:.3g}"
        rows.append([case, impl, *_cells(m), _ratio(m, impls[floor]), tflops])
        records.append({"suite": "device", "case": case, "impl": impl, **m})


def _runnable(backend: str, q, k, v, scale) -> bool:
    inputs, _ = check_op_inputs(q, k, v, "embedded_gaussian", scale, None, backend)
    return not BACKENDS[backend].not_supported_reasons(inputs)


def _softmax_impls(timer, q, k, v, scale, backends, reference_limit):
    impls = {"bare F.sdpa": timer.measure(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), [q, k, v])}
    # xformers, where it can run, side by side with torch's kernels: the evidence for AUTO_ORDER.
    for backend in [*backends, *(["xformers"] if _runnable("xformers", q, k, v, scale) else [])]:
        impls[f"nonlocal_op {backend}"] = timer.measure(
            lambda backend=backend: nonlocal_op(q, k, v, scale=scale, backend=backend), [q, k, v])
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= reference_limit:
        impls["materialised"] = timer.measure(lambda: nonlocal_op(q, k, v, scale=scale, backend="reference"), [q, k, v])
    return impls


def suite_softmax(args, timer, device, dtype, records):
    rows = []
    n = _shrink(16384, args.quick)
    for d in (64, 128, 256):
        q, k, v = _qkv(2, 4, n, n, d, d, device, dtype)
        impls = _softmax_impls(timer, q, k, v, d**-0.5, ["auto"], args.reference_limit)
        _rows_against_floor(f"B=2 H=4 N=M={n} d={d}", impls, "bare F.sdpa", 4 * 8 * n * n * d, rows, records)
    wide = ((1, 25088, 25088, 512), (1, 12544, 12544, 320), (8, 1568, 1568, 1024))
    for b, nq, nk, d in wide:
        nq, nk = _shrink(nq, args.quick), _shrink(nk, args.quick)
        q, k, v = _qkv(b, 1, nq, nk, d, d, device, dtype)
        impls = _softmax_impls(timer, q, k, v, d**-0.5, ["auto", "blocked"], args.reference_limit)
        _rows_against_floor(f"wide B={b} N=M={nq} d={d}", impls, "bare F.sdpa", 4 * b * nq * nk * d, rows, records)
    print_table(f"Softmax modes against their floor ({_where(device, dtype)}; ratio: fwd+bwd / bare F.sdpa)",
                ["case", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd+bwd vs floor", "fwd TFLOP/s"], rows)


def suite_modes(args, timer, device, dtype, records):
    rows = []
    n, d = _shrink(8192, args.quick), 64
    for mode, backend in (("dot_product", "linear"), ("concatenation", "sorted")):
        theta, phi, g = _qkv(1, 1, n, n, d, d, device, dtype)
        w = torch.randn(2 * d, device=device, dtype=dtype, requires_grad=True)
        cw = w if mode == "concatenation" else None
        inputs = [theta, phi, g] + ([w] if cw is not None else [])
        impls = {name: timer.measure(lambda name=name: nonlocal_op(theta, phi, g, mode, concat_weight=cw, backend=name), inputs)
                 for name in ("reference", backend)}
        for impl, m in impls.items():
            rows.append([f"{mode} N=M={n} d={d}", impl, *_cells(m), _ratio(m, impls["reference"], inverse=True)])
            records.append({"suite": "device", "case": f"{mode} N={n}", "impl": impl, **m})
    print_table(f"Dot product and concatenation against the materialised formula ({_where(device, dtype)})",
                ["case", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "speed-up vs materialised"], rows)


def suite_ring(args, timer, device, dtype, records):
    world, block = 4, _shrink(8192, args.quick)
    q, k, v = _qkv(2, 4, world * block, world * block, 64, 64, device, dtype)
    scale = 64**-0.5
    impls = {
        "one flash call (F.sdpa)": timer.measure(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), [q, k, v]),
        f"ring schedule, P={world}, one process": timer.measure(lambda: local_ring_attention(q, k, v, scale, world), [q, k, v]),
    }
    rows = []
    _rows_against_floor(f"B=2 H=4 N=M={world}x{block} d=64", impls, "one flash call (F.sdpa)",
                        4 * 8 * (world * block) ** 2 * 64, rows, records)
    print_table(f"Ring schedule in one process against one call on the whole sequence ({_where(device, dtype)})",
                ["case", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd+bwd vs floor", "fwd TFLOP/s"], rows)


class PlainBlock(nn.Module):
    """The embedded-gaussian block in a few lines: 1x1x1 convs, 2x2 spatial max pool, SDPA, W_z, BN."""

    def __init__(self, channels: int, sub_sample: bool):
        super().__init__()
        inter = channels // 2
        self.theta, self.phi, self.g = (nn.Conv3d(channels, inter, 1) for _ in range(3))
        self.pool = nn.MaxPool3d((1, 2, 2)) if sub_sample else nn.Identity()
        self.W_z = nn.Conv3d(inter, channels, 1, bias=False)
        self.bn = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)[:, None]
        phi = self.pool(self.phi(x)).flatten(2).transpose(1, 2)[:, None]
        g = self.pool(self.g(x)).flatten(2).transpose(1, 2)[:, None]
        y = F.scaled_dot_product_attention(theta, phi, g, scale=1.0)[:, 0].transpose(1, 2).reshape(b, -1, t, h, w)
        return x + self.bn(self.W_z(y))


def suite_block(args, timer, device, dtype, records):
    rows = []
    shapes = {"I3D res4": (8, 1024, 8, 14, 14), "I3D res3": (4, 512, 16, 28, 28)}
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else nullcontext
    for name, shape in shapes.items():
        if args.quick:
            shape = (2, shape[1] // 8, max(shape[2] // 4, 2), shape[3], shape[4])
        x = torch.randn(shape, device=device, requires_grad=True)
        impls = {}
        for impl, block in (("plain block (convs + SDPA + BN)", PlainBlock(shape[1], True)),
                            ("NonLocalBlock auto", NonLocalBlock(shape[1], sub_sample=True))):
            block = block.to(device)
            nn.init.normal_(block.bn.weight if isinstance(block, PlainBlock) else block.norm.weight)
            params = [x, *block.parameters()]

            def forward(block=block):
                with autocast():
                    return block(x)

            impls[impl] = timer.measure(forward, params)
        for impl, m in impls.items():
            rows.append([f"{name} x {tuple(shape)}", impl, *_cells(m), _ratio(m, impls["plain block (convs + SDPA + BN)"])])
            records.append({"suite": "device", "case": name, "shape": shape, "impl": impl, **m})
    print_table(f"The block against a plain PyTorch block, autocast {str(dtype).split('.')[-1]} ({_where(device, dtype)})",
                ["case", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd+bwd vs plain"], rows)


def _where(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}, {str(dtype).split('.')[-1]}"


SUITES = {"softmax": suite_softmax, "modes": suite_modes, "ring": suite_ring, "block": suite_block}


def run(args, records: list) -> None:
    """Run the parts of ``args.parts`` (names of ``SUITES``) on ``args.device`` in ``args.dtype``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (torch.cuda.is_available() is False)")
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.repeats)
    for part in args.parts:
        SUITES[part](args, timer, device, dtype, records)
