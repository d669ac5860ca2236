"""The sharded runtime's own cost per op: each op on a ``ShardedTensor`` against the same op on its
local tensor, on a group of one (no communication: what is left is the rules' Python), and a
diffusers Wan transformer parallelized on a group of one against the plain model.

The ops are those of a DiT block at ``bench_dit.py``'s 512-token size (tokens (1, N, C), C = 128,
4 heads of 32), as the Wan attention processor and its feed-forward call them: the rotary
embedding's products with whole-length plain tensors (sliced to the shard by the rule), the heads'
``unflatten``/``flatten``, a residual sum, casts, norms, a linear layer, the attention itself
(self-attention, and cross-attention to plain text keys).

Columns: the best time per call of a loop of ``--calls`` calls (the median of ``--rounds`` rounds,
each timing the plain op and ours in turn, which goes first alternating), the runtime's overhead
per call (ours - plain) and the ratio. The model rows time one forward (under no_grad) and one
forward+backward.

    python scripts/bench_overhead.py [--tokens 512] [--calls 200] [--rounds 7] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from bench_utils import best_time, print_table, spawn_ranks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens N of the op rows")
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop of an op row")
    p.add_argument("--rounds", type=int, default=7, help="rounds (the median of their best times)")
    p.add_argument("--repeats", type=int, default=5, help="timed loops (or model steps) per round, the best taken")
    p.add_argument("--no-model", action="store_true", help="skip the Wan rows")
    return p.parse_args(argv)


TOK, QKV, HEADS = "b n c", "b n h d", "b h n d"


def _cases(n: int) -> dict:
    """name -> (function of the inputs, the inputs as (layout, tensor): sharded along its axis ``n``;
    a layout of None: a plain tensor)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x, y = r(1, n, 128), r(1, n, 128)
    q = r(1, n, 4, 32)
    cos = r(1, n, 1, 16)  # the rotary table: plain, whole length
    heads, text = r(1, 4, n, 32), r(1, 4, 16, 32)
    weight, bias, scale = r(128, 128), r(128), r(128)

    def rope(q, cos):
        x1, _ = q.unflatten(-1, (-1, 2)).unbind(-1)
        return x1 * cos

    return {
        "x + y (both sharded)": (torch.add, [(TOK, x), (TOK, y)]),
        "x * 2.0": (lambda a: a * 2.0, [(TOK, x)]),
        "x * cos (plain, whole length)": (torch.mul, [(QKV, q[..., :16]), (None, cos)]),
        "unflatten + unbind + product (rotary)": (rope, [(QKV, q), (None, cos)]),
        "x.unflatten(2, (4, -1))": (lambda a: a.unflatten(2, (4, -1)), [(TOK, x)]),
        "x.flatten(2, 3)": (lambda a: a.flatten(2, 3), [(QKV, q)]),
        "x.transpose(1, 2)": (lambda a: a.transpose(1, 2), [(QKV, q)]),
        "x.type_as(y)": (lambda a, b: a.type_as(b), [(TOK, x), (TOK, y)]),
        "x.float()": (lambda a: a.float(), [(TOK, x)]),
        "torch.empty_like(x)": (torch.empty_like, [(TOK, x)]),
        "F.linear": (F.linear, [(TOK, x), (None, weight), (None, bias)]),
        "F.layer_norm": (lambda a: F.layer_norm(a, (128,), eps=1e-6), [(TOK, x)]),
        "F.rms_norm": (lambda a, w: F.rms_norm(a, (128,), w, 1e-6), [(TOK, x), (None, scale)]),
        "out[..., 0::2] = x": (_setitem, [(QKV, q), (QKV, q[..., :16])]),
        "SDPA, self-attention": (F.scaled_dot_product_attention, [(HEADS, heads)] * 3),
        "SDPA, cross-attention to plain text": (F.scaled_dot_product_attention,
                                                [(HEADS, heads), (None, text), (None, text)]),
    }


def _setitem(out, x):
    out[..., 0::2] = x
    return out


def _ops(rank, world, args, group) -> list[list]:
    from nonlocal_dist.sharded import distribute

    rows = []
    for name, (fn, inputs) in _cases(args.tokens).items():
        plain = [t.clone() for _, t in inputs]
        ours = []
        for (layout, _), p in zip(inputs, plain):
            ours.append(p if layout is None else distribute(p, group, layout, "n"))

        def loop(values):
            def run():
                for _ in range(args.calls):
                    fn(*values)
            return run

        rows.append(_row(name, loop(plain), loop(ours), args, args.calls))
    return rows


def _row(label: str, plain, ours, args, calls: int = 1) -> list:
    """``[label, plain µs, ours µs, overhead µs, ratio]``: the median over ``args.rounds`` rounds of
    the best of ``args.repeats`` runs of each (one run: ``calls`` calls), plain first in even rounds
    and ours first in odd ones (neither always warm)."""
    times = {"plain": [], "ours": []}
    for turn in range(args.rounds):
        pairs = (("plain", plain), ("ours", ours))
        for key, run in pairs if turn % 2 == 0 else pairs[::-1]:
            times[key].append(best_time(run, args.repeats) / calls * 1e6)
    a, b = statistics.median(times["plain"]), statistics.median(times["ours"])
    return [label, a, b, b - a, b / a]


def _model_rows(rank, world, args, group) -> list[list]:
    import bench_dit as dit

    from nonlocal_dist import parallelize

    margs = dit.parse_args([])
    plain = dit._model(margs)
    ours = parallelize(dit._model(margs), group, "t", layout="b c t h w", inputs=("hidden_states",))
    x, t, text, w = dit._inputs(margs)
    rows = []
    for label, backward in (("Wan forward (no_grad)", False), ("Wan forward+backward", True)):
        runs = [dit._step(m, dit._forward(margs), x, t, text, w, backward=backward) for m in (plain, ours)]
        rows.append(_row(f"{label}, {margs.frames * margs.size ** 2 // 4} tokens", *runs, args))
    return rows


def _ranks(rank, world, args, group):
    rows = _ops(rank, world, args, group)
    return rows, ([] if args.no_model else _model_rows(rank, world, args, group))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    ops, models = spawn_ranks(_ranks, 1, args)[0]
    columns = ["plain (µs)", "ours (µs)", "overhead (µs)", "ours / plain"]
    print_table(f"Per-op cost of the sharded runtime, N = {args.tokens}, float32, 1 thread",
                ["op (group of one)", *columns], ops)
    if models:
        print_table("A diffusers Wan transformer parallelized on a group of one", ["run", *columns], models)


if __name__ == "__main__":
    main()
