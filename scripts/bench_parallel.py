"""Sequence-parallel suite: each strategy on 1, 2, 4 gloo ranks (1 thread each) at a fixed total N,
next to single-process SDPA with the same total number of threads, measured in one run; then, on
2 ranks, ``allgather`` and ``ulysses`` next to plain code doing the same on the same inputs (an
autograd all-gather of k and v followed by SDPA; DeepSpeed's ``DistributedAttention`` around SDPA).

Run through ``python scripts/benchmark.py --suite parallel [--n 16384] [--worlds 1 2 4] [--compare-n 16384 32768]``.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch.distributed._functional_collectives as funcol

from bench_utils import best_time, peak_memory_mb, print_table, spawn_ranks
from nonlocal_dist import nonlocal_op

# torch's differentiable all-gather along any dim (renamed in torch 2.13)
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd

# (mode, strategy, heads): ulysses needs heads divisible by the group size.
CASES = [
    ("embedded_gaussian", "ring", 1),
    ("embedded_gaussian", "allgather", 1),
    ("embedded_gaussian", "ulysses", 4),
    ("dot_product", "allreduce", 1),
    ("concatenation", "sorted_stats", 1),
]


def _inputs(n: int, d: int, heads: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, heads, n, d, generator=gen) for _ in range(3)]
    w = torch.randn(2 * d, generator=gen)
    shards = [torch.tensor_split(t, world, dim=2)[rank].contiguous().requires_grad_() for t in full]
    return shards, w.requires_grad_()


def _step(mode, strategy, shards, w, group):
    def run():
        scale = 1 / math.sqrt(shards[0].shape[-1]) if mode == "embedded_gaussian" else None
        cw = w if mode == "concatenation" else None
        y = nonlocal_op(*shards, mode, scale=scale, concat_weight=cw, group=group, strategy=strategy)
        y.backward(torch.ones_like(y))
        dist.barrier(group)
    return run


def _plain_allgather(shards, group):
    """The baseline of ``allgather``: k and v all-gathered by torch's differentiable collective, then SDPA."""
    q, k, v = shards

    def run():
        k_full, v_full = _all_gather_autograd(k, 2, group), _all_gather_autograd(v, 2, group)
        y = F.scaled_dot_product_attention(q, k_full, v_full, scale=1 / math.sqrt(q.shape[-1]))
        y.backward(torch.ones_like(y))
        dist.barrier(group)
    return run


def _deepspeed_ulysses(shards, group):
    """The baseline of ``ulysses``: DeepSpeed's DistributedAttention (its all-to-alls) around SDPA.

    Its layout is (B, L, H, d): the same values, transposed once before timing.
    """
    from deepspeed.sequence.layer import DistributedAttention

    from nonlocal_dist.integrations.deepspeed_sp import init_distributed

    init_distributed("gloo")
    scale = 1 / math.sqrt(shards[0].shape[-1])

    def local_attention(q, k, v, *args, **kwargs):  # (B, N, H/P, d) -> SDPA on (B, H/P, N, d)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale).transpose(1, 2)

    attention = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in shards)

    def run():
        y = attention(q, k, v, 0)
        y.backward(torch.ones_like(y))
        dist.barrier(group)
    return run


def _comparisons(rank, world, args, group) -> list:
    """(n, strategy, baseline, t, peak, baseline t, baseline peak) for allgather and ulysses."""
    rows = []
    for n in args.compare_n:
        shards, w = _inputs(n, args.d, args.compare_heads, rank, world)
        pairs = [("allgather", "all-gather k, v + SDPA", _plain_allgather(shards, group))]
        if args.compare_heads % world == 0:
            try:
                pairs.append(("ulysses", "DeepSpeed DistributedAttention + SDPA", _deepspeed_ulysses(shards, group)))
            except ImportError:
                print("DeepSpeed is not installed: ulysses is shown without its baseline")
                pairs.append(("ulysses", "-", None))
        for strategy, name, baseline in pairs:
            run = _step("embedded_gaussian", strategy, shards, w, group)
            measured = [best_time(run, args.repeats), _least_peak(run)]
            if baseline is not None:
                measured += [best_time(baseline, args.repeats), _least_peak(baseline)]
            else:
                measured += [float("nan"), float("nan")]
            rows.append((n, strategy, name, *measured))
    return rows


def _least_peak(run) -> float:
    # The smaller peak of two runs: gloo's worker threads free their buffers at moments that vary
    # from run to run (one gathered tensor more or less at the peak, either system alike).
    return min(peak_memory_mb(run) for _ in range(2))


def _rank_main(rank, world, args, group) -> list:
    if args.compare_only:
        return _comparisons(rank, world, args, group)
    results = []
    for mode, strategy, heads in CASES:
        if heads % world and strategy == "ulysses":
            continue
        shards, w = _inputs(args.n, args.d, heads, rank, world)
        run = _step(mode, strategy, shards, w, group)
        t = best_time(run, args.repeats)
        results.append((mode, strategy, heads, args.n, t, peak_memory_mb(run)))
    shards, w = _inputs(args.memory_n, args.d, 1, rank, world)
    run = _step("embedded_gaussian", "ring", shards, w, group)
    run()
    results.append(("embedded_gaussian", "ring (memory case)", 1, args.memory_n, float("nan"), peak_memory_mb(run)))
    return results


def _spawn(world: int, args) -> dict:
    """Every rank's result list of ``_rank_main``, by rank."""
    return spawn_ranks(_rank_main, world, args, timeout_min=60)


def _run_world(world: int, args) -> list:
    per_rank = _spawn(world, args)
    # Per case: the slowest rank's time and the largest rank's peak memory.
    merged = []
    for i, (mode, strategy, heads, n, _, _) in enumerate(per_rank[0]):
        merged.append((mode, strategy, heads, n, max(per_rank[r][i][4] for r in per_rank),
                       max(per_rank[r][i][5] for r in per_rank)))
    return merged


def _sdpa_baseline(n: int, d: int, heads: int, threads: int, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))

    def run():
        y = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d))
        y.backward(torch.ones_like(y))

    return best_time(run, repeats), peak_memory_mb(run)


def main(argv) -> list:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16384, help="total positions N = M")
    parser.add_argument("--memory-n", type=int, default=32768, help="total N of the per-rank memory case")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-n", type=int, nargs="*", default=[16384, 32768],
                        help="total N of the 2-rank comparison with plain all-gather + SDPA and DeepSpeed (none: skip)")
    parser.add_argument("--compare-heads", type=int, default=2, help="heads of the comparison (d per head: --d)")
    args = parser.parse_args(argv)
    args.compare_only = False
    rows, records = [], []
    memory = {}
    for world in args.worlds:
        baselines = {h: _sdpa_baseline(args.n, args.d, h, world, args.repeats) for h in (1, 4)}
        for mode, strategy, heads, n, t, mem in _run_world(world, args):
            if strategy == "ring (memory case)":
                memory[world] = mem
                continue
            base_t, base_mem = baselines[heads]
            ratio = f"{t / base_t:.2f}x" if mode == "embedded_gaussian" else "-"
            rows.append([mode, strategy, heads, world, 1e3 * t, mem, 1e3 * base_t, base_mem, ratio])
            records.append({"suite": "parallel", "mode": mode, "strategy": strategy, "heads": heads, "world": world,
                            "n": n, "d": args.d, "fwd_bwd_ms": 1e3 * t, "peak_mb_per_rank": mem,
                            "sdpa_threads": world, "sdpa_ms": 1e3 * base_t, "sdpa_peak_mb": base_mem})
    print_table(
        f"Sequence parallel on gloo, N = M = {args.n} total, d = {args.d} per head, float32, 1 thread per rank; "
        "baseline: single-process F.scaled_dot_product_attention with threads = ranks",
        ["mode", "strategy", "heads", "ranks", "fwd+bwd ms (slowest rank)", "peak MiB per rank",
         "SDPA ms", "SDPA peak MiB", "time / SDPA"],
        rows,
    )
    if 1 in memory:
        mem_rows = [[w, memory[w], f"{memory[w] / memory[1]:.2f}x"] for w in sorted(memory)]
        print_table(f"Ring, embedded gaussian, N = {args.memory_n} total, d = {args.d}: peak memory per rank during fwd+bwd",
                    ["ranks", "peak MiB per rank", "vs 1 rank"], mem_rows)
        records += [{"suite": "parallel_memory", "world": w, "n": args.memory_n, "peak_mb_per_rank": memory[w]} for w in memory]
    if args.compare_n:
        records += _compare(args)
    return records


def _compare(args) -> list:
    """2 ranks: allgather and ulysses next to their baselines, the largest rank's peak and the slowest rank's time."""
    args.compare_only = True
    per_rank = _spawn(2, args)
    rows, records = [], []
    for i, (n, strategy, baseline, *_) in enumerate(per_rank[0]):
        t, mem, base_t, base_mem = (max(per_rank[r][i][3 + j] for r in per_rank) for j in range(4))
        rows.append([n, strategy, 1e3 * t, mem, baseline, 1e3 * base_t, base_mem, f"{mem / base_mem:.2f}x", f"{t / base_t:.2f}x"])
        records.append({"suite": "parallel_baselines", "strategy": strategy, "baseline": baseline, "world": 2, "n": n,
                        "d": args.d, "heads": args.compare_heads, "fwd_bwd_ms": 1e3 * t, "peak_mb_per_rank": mem,
                        "baseline_ms": 1e3 * base_t, "baseline_peak_mb": base_mem})
    print_table(
        f"Embedded gaussian on 2 gloo ranks, d = {args.d}, H = {args.compare_heads}, float32, 1 thread per rank: "
        "each strategy next to plain code doing the same on the same inputs (peak: the larger rank's, torch allocator)",
        ["N total", "strategy", "fwd+bwd ms", "peak MiB per rank", "baseline", "baseline ms", "baseline peak MiB",
         "memory / baseline", "time / baseline"],
        rows,
    )
    return records
