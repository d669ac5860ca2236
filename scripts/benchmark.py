"""Benchmarks: the library against the materialised formula (and bare SDPA) in the same process.

    python scripts/benchmark.py                       # single-device suite, float32, 2 threads
    python scripts/benchmark.py --suite parallel      # sequence-parallel suite on gloo ranks
    python scripts/benchmark.py --suite decode        # per-shard video decoding and the loader (bench_decode.py)
    python scripts/benchmark.py --json results.json   # also write every number as JSON
    python scripts/benchmark.py --device cuda         # every path against its floor on a GPU (bench_gpu.py)
    python scripts/benchmark.py --suite device --device cpu --quick   # the same rows, small, on CPU

Times are the minimum over --repeats runs; memory is the peak of the bytes held by torch's CPU
allocator during one forward+backward beyond those held before it (every allocation and free is
recorded, as torch.cuda.max_memory_allocated does on a GPU). Tables are GitHub markdown.
"""
from __future__ import annotations

import argparse
import json
import math

import bench_gpu
import torch
import torch.nn.functional as F
from bench_utils import best_time, peak_memory_mb, print_table

from nonlocal_dist import MODES, NonLocalBlock, nonlocal_op
from nonlocal_dist.sharded import group_batch_norm


def _op_inputs(n: int, d: int, heads: int = 1, requires_grad: bool = True):
    gen = torch.Generator().manual_seed(0)
    theta, phi, g = (torch.randn(1, heads, n, d, generator=gen).requires_grad_(requires_grad) for _ in range(3))
    w = torch.randn(2 * d, generator=gen).requires_grad_(requires_grad)
    return theta, phi, g, w


def _op_runner(mode: str, backend: str, theta, phi, g, w, backward: bool):
    cw = w if mode == "concatenation" else None
    scale = 1 / math.sqrt(theta.shape[-1]) if mode in ("gaussian", "embedded_gaussian") else None

    def run():
        y = nonlocal_op(theta, phi, g, mode, scale=scale, concat_weight=cw, backend=backend)
        if backward:
            y.backward(torch.ones_like(y))
        return y

    return run


def _measure(run_fwd, run_bwd, repeats: int) -> dict:
    return {
        "fwd_ms": 1e3 * best_time(run_fwd, repeats),
        "fwd_bwd_ms": 1e3 * best_time(run_bwd, repeats),
        "peak_mb": peak_memory_mb(run_bwd),
    }


def suite_modes(args, records: list) -> None:
    """Every mode: nonlocal_op (auto) against the materialised reference; block and floor rows."""
    rows = []
    for mode in MODES:
        for n in args.sizes:
            theta, phi, g, w = _op_inputs(n, args.d)
            lib = _measure(*(_op_runner(mode, "auto", theta, phi, g, w, b) for b in (False, True)), args.repeats)
            ref = None
            if n <= args.max_reference_n:
                ref = _measure(*(_op_runner(mode, "reference", theta, phi, g, w, b) for b in (False, True)), args.repeats)
            entries = [("nonlocal_op", lib)]
            if mode == "embedded_gaussian":
                entries += [("block (C=2d)", _block_case(n, args)), ("floor: bare F.sdpa", _floor_case(n, args))]
            for impl, m in entries + ([("materialised", ref)] if ref else []):
                speed = ref["fwd_bwd_ms"] / m["fwd_bwd_ms"] if ref else None
                rows.append([mode, n, impl, m["fwd_ms"], m["fwd_bwd_ms"], m["peak_mb"],
                             f"{speed:.2f}x" if speed else "-", _saving(ref, m)])
                records.append({"suite": "modes", "mode": mode, "n": n, "d": args.d, "impl": impl, **m})
            if mode == "embedded_gaussian":
                block, floor = entries[1][1], entries[2][1]
                rows.append([mode, n, "block / floor", "", f"{block['fwd_bwd_ms'] / floor['fwd_bwd_ms']:.2f}x", "", "", ""])
    print_table(
        f"Single device, float32, d = dv = {args.d}, {torch.get_num_threads()} threads (N = M positions; "
        "peak MiB: torch allocator peak during forward+backward)",
        ["mode", "N", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "speed-up vs materialised", "memory saving"],
        rows,
    )


def _saving(ref: dict | None, m: dict) -> str:
    return "-" if ref is None else f"{ref['peak_mb'] / m['peak_mb']:.1f}x"


def _block_case(n: int, args) -> dict:
    block = NonLocalBlock(2 * args.d, layout="b n c", use_scale=True)
    x = torch.randn(1, n, 2 * args.d, requires_grad=True)

    def run(backward):
        def f():
            z = block(x)
            if backward:
                z.backward(torch.ones_like(z))
        return f

    return _measure(run(False), run(True), args.repeats)


def _floor_case(n: int, args) -> dict:
    q, k, v, _ = _op_inputs(n, args.d)

    def run(backward):
        def f():
            y = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(args.d))
            if backward:
                y.backward(torch.ones_like(y))
        return f

    return _measure(run(False), run(True), args.repeats)


def _matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / best_time(lambda: a @ b, repeats) / 1e9


def suite_flops(args, records: list) -> None:
    """Achieved GFLOP/s of the attention path against a plain matmul in the same run."""
    n, d = args.flops_n, 64
    theta, phi, g, w = _op_inputs(n, d)
    matmul = _matmul_gflops(args.repeats)
    fwd = best_time(_op_runner("embedded_gaussian", "auto", theta, phi, g, w, False), args.repeats)
    both = best_time(_op_runner("embedded_gaussian", "auto", theta, phi, g, w, True), args.repeats)
    rows = [
        ["plain matmul 4096^3", "-", matmul, "100%"],
        ["attention forward", 1e3 * fwd, 4 * n * n * d / fwd / 1e9, f"{400 * n * n * d / fwd / 1e9 / matmul:.0f}%"],
        ["attention forward+backward", 1e3 * both, 14 * n * n * d / both / 1e9, f"{1400 * n * n * d / both / 1e9 / matmul:.0f}%"],
    ]
    for r in rows:
        records.append({"suite": "flops", "case": r[0], "n": n, "d": d, "ms": r[1], "gflops": r[2]})
    print_table(f"Achieved GFLOP/s, N = {n}, d = {d} (4·N²·d forward, 14·N²·d forward+backward)",
                ["case", "ms", "GFLOP/s", "of matmul"], rows)


def _block_video(shape, mode, sub_sample, backward):
    block = NonLocalBlock(shape[1], mode=mode, sub_sample=sub_sample)
    x = torch.randn(*shape, requires_grad=backward)

    def run():
        if backward:
            z = block(x)
            z.backward(torch.ones_like(z))
        else:
            with torch.no_grad():
                block(x)

    return run


def suite_large(args, records: list) -> None:
    """Sizes the materialised form cannot reach: dot product at 1M positions, a 401k-position video."""
    rows = []
    times = {}
    for shape in ((1, 64, 2, 256, 256), (1, 64, 16, 256, 256)):
        n = math.prod(shape[2:])
        run = _block_video(shape, "dot_product", None, backward=True)
        t = best_time(run, args.repeats)
        mem = peak_memory_mb(run)
        times[n] = t
        affinity_gb = n * n * 4 / 1e9
        rows.append(["dot_product block, fwd+bwd", "x".join(map(str, shape)), n, 1e3 * t, mem, f"{affinity_gb:.0f} GB"])
        records.append({"suite": "large", "case": "dot_product", "shape": shape, "n": n, "fwd_bwd_ms": 1e3 * t, "peak_mb": mem})
    small, big = sorted(times)
    rows.append(["time ratio 1M / 128k", "", "", f"{times[big] / times[small]:.2f}x", "", ""])
    shape = tuple(args.video)
    run = _block_video(shape, "embedded_gaussian", {"h": 2, "w": 2}, backward=False)
    t = best_time(run, 1, warmup=0)
    mem = peak_memory_mb(run)
    n = math.prod(shape[2:])
    m = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    rows.append(["embedded gaussian block, sub_sample {h:2,w:2}, fwd", "x".join(map(str, shape)), n, 1e3 * t, mem, f"{n * m * 4 / 1e9:.0f} GB"])
    records.append({"suite": "large", "case": "video", "shape": shape, "n": n, "m": m, "fwd_ms": 1e3 * t, "peak_mb": mem})
    print_table("Beyond the materialised form (float32)", ["case", "input", "N", "ms", "peak MiB", "N×M affinity would need"], rows)


def suite_concat(args, records: list) -> None:
    """Concatenation at N = 16384, d = 128: sorted prefix sums against the materialised form."""
    n, d = args.concat_n, 128
    results = {}
    for backend in ("auto", "reference"):
        theta, phi, g, w = _op_inputs(n, d)
        run = _op_runner("concatenation", backend, theta, phi, g, w, True)
        t = best_time(run, args.repeats)
        theta.grad = phi.grad = g.grad = w.grad = None
        mem = peak_memory_mb(run)
        results[backend] = (t, mem, [x.grad.clone() for x in (theta, phi, g, w)])
        theta.grad = phi.grad = g.grad = w.grad = None
        with torch.no_grad():
            results[backend] += (nonlocal_op(theta, phi, g, "concatenation", concat_weight=w, backend=backend),)
    (t_lib, m_lib, g_lib, y_lib), (t_ref, m_ref, g_ref, y_ref) = results["auto"], results["reference"]
    diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip([y_lib, *g_lib], [y_ref, *g_ref])]
    rows = [
        ["sorted (auto)", 1e3 * t_lib, m_lib, f"{t_ref / t_lib:.1f}x", _saving({"peak_mb": m_ref}, {"peak_mb": m_lib})],
        ["materialised", 1e3 * t_ref, m_ref, "1x", "1x"],
        ["max rel. difference y, dθ, dφ, dg, dw", " ".join(f"{x:.1e}" for x in diffs), "", "", ""],
    ]
    records.append({"suite": "concat", "n": n, "d": d, "lib_ms": 1e3 * t_lib, "ref_ms": 1e3 * t_ref,
                    "lib_mb": m_lib, "ref_mb": m_ref, "rel_diffs": diffs})
    print_table(f"Concatenation, N = M = {n}, d = {d}, forward+backward", ["impl", "ms", "peak MiB", "speed-up", "memory saving"], rows)


def suite_norm(args, records: list) -> None:
    """Group BatchNorm (``group_batch_norm``, no group) against ``nn.BatchNorm3d``, training fwd+bwd, on the
    activations of the video suite's I3D (one rank's shard of 64 frames at 112x112 over 2 ranks)."""
    rows = []
    for shape in [(1, 16, 32, 56, 56), (1, 32, 16, 28, 28), (1, 64, 16, 14, 14), (1, 128, 16, 7, 7)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        bn = torch.nn.BatchNorm3d(shape[1])
        t_torch = best_time(lambda: bn(x).backward(dy), args.repeats)
        t_group = best_time(lambda: group_batch_norm(x, bn, None).backward(dy), args.repeats)
        rows.append([str(shape), 1e3 * t_group, 1e3 * t_torch, f"{t_group / t_torch:.2f}x"])
        records.append({"suite": "norm", "shape": shape, "group_ms": 1e3 * t_group, "torch_ms": 1e3 * t_torch})
    print_table("Group BatchNorm without a group vs nn.BatchNorm3d, training forward+backward, float32",
                ["activation", "group_batch_norm ms", "nn.BatchNorm3d ms", "time / torch"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["single", "parallel", "device", "decode"],
                        help="single (CPU, the default), parallel (gloo ranks), device (every path against its "
                             "floor on --device; the default with --device cuda) or decode (per-shard video decoding; "
                             "bench_decode.py's options pass through)")
    parser.add_argument("--parts", nargs="+", help="parts of the suite to run (single: modes flops concat large norm; "
                                                   "device: softmax modes ring block)")
    parser.add_argument("--device", default="cpu", help="device suite: cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(bench_gpu.DTYPES), default="bfloat16", help="device suite dtype")
    parser.add_argument("--quick", action="store_true", help="device suite: every size divided (proves the code runs)")
    parser.add_argument("--reference-limit", type=float, default=2**30,
                        help="device suite: largest B*H*N*M for the materialised formula")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="positions N = M")
    parser.add_argument("--d", type=int, default=32, help="channels per position (theta/phi/g)")
    parser.add_argument("--max-reference-n", type=int, default=16384, help="largest N for the materialised form")
    parser.add_argument("--flops-n", type=int, default=16384)
    parser.add_argument("--concat-n", type=int, default=16384)
    parser.add_argument("--video", type=int, nargs=5, default=[1, 64, 32, 112, 112], help="B C T H W")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel-parts", nargs="+", default=["strategies", "video"], choices=["strategies", "video"],
                        help="parallel-suite parts: the non-local strategies (bench_parallel.py) and the sharded "
                             "I3D network (bench_video.py)")
    parser.add_argument("--video-clip", type=int, nargs=5, action="append", metavar=("B", "C", "T", "H", "W"),
                        help="clip of the parallel suite's video part (repeatable; default: 64x112x112 and 64x224x224)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="write every measured number to PATH")
    args, rest = parser.parse_known_args(argv)
    args.suite = args.suite or ("device" if args.device != "cpu" else "single")
    if args.suite != "device" and args.device != "cpu":
        parser.error(f"--suite {args.suite} runs on CPU; --device {args.device} needs --suite device")
    records: list = []
    if args.suite == "decode":
        import bench_decode

        repeats = [] if args.repeats == parser.get_default("repeats") else ["--repeats", str(args.repeats)]
        rows = bench_decode.main([*rest, *repeats])  # its own default: 7 repeats
        records = [{"suite": "decode", "measure": name, "value": value} for name, value in rows]
    elif args.suite == "parallel":
        if "strategies" in args.parallel_parts:
            import bench_parallel

            records = bench_parallel.main(rest)
        if "video" in args.parallel_parts:
            import bench_video

            clips = [arg for clip in args.video_clip or [] for arg in ("--clip", *map(str, clip))]
            records += bench_video.main(clips)
    else:
        if rest:
            parser.error(f"unrecognised arguments: {' '.join(rest)}")
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        suites = bench_gpu.SUITES if args.suite == "device" else {
            "modes": suite_modes, "flops": suite_flops, "concat": suite_concat, "large": suite_large,
            "norm": suite_norm}
        args.parts = args.parts or list(suites)
        if set(args.parts) - set(suites):
            parser.error(f"--parts of suite {args.suite}: choose from {' '.join(suites)}, given {' '.join(args.parts)}")
        if args.suite == "device":
            bench_gpu.run(args, records)
        else:
            for part in args.parts:
                suites[part](args, records)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(records, out, indent=1, default=str)
        print(f"\nwrote {len(records)} records to {args.json}")


if __name__ == "__main__":
    main()
