"""Sweep torch's OpInfo samples over sharded activations and write the coverage table.

Every case (an op's float64 sample with one or two tensor arguments sharded: 2 ranks uneven, 3
ranks with an empty piece, two arguments or two dims over one group, a 2x2 mesh) runs on real gloo
ranks and is classified exact / refused / unchecked / skip / BAD against the one-process result
(``nonlocal_dist.sharded.sweep``). Prints the markdown table and writes it to ``--out``; BAD
cases are printed to stderr as they are found. Exits 1 when any case is BAD.

    python scripts/op_sweep.py                       # all ops, 2 samples each (~15 min on 2 cores)
    python scripts/op_sweep.py --ops sum,var,nn.functional.pad.reflect --samples 0
    python scripts/op_sweep.py --kinds uneven,empty --every 5
"""
from __future__ import annotations

import argparse
import sys
import time

from nonlocal_dist.sharded.sweep import KINDS, enumerate_cases, markdown, run_cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="", help="comma-separated OpInfo names (name or name.variant); all if empty")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated case kinds of {KINDS}")
    parser.add_argument("--samples", type=int, default=2, help="samples per op, spread over its list (0: all)")
    parser.add_argument("--every", type=int, default=1, help="run every n-th case only (a deterministic thinning)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take before it counts as hung")
    parser.add_argument("--out", default="op_sweep.md", help="file for the markdown table")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {KINDS}")
    ops = [o for o in args.ops.split(",") if o] or None
    cases = enumerate_cases(ops, kinds, args.samples or None, args.every)
    print(f"{len(cases)} cases", file=sys.stderr, flush=True)

    def progress(verdict):
        if verdict.label == "BAD":
            print(verdict, file=sys.stderr, flush=True)

    verdicts, seconds = [], {}
    for world in sorted({c.world for c in cases}):
        mine = [c for c in cases if c.world == world]
        start = time.monotonic()
        verdicts += run_cases(mine, timeout=args.timeout, progress=progress)
        seconds[world] = time.monotonic() - start
    table = markdown(verdicts, seconds)
    print(table)
    with open(args.out, "w") as f:
        f.write(table)
    return 1 if any(v.label == "BAD" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
