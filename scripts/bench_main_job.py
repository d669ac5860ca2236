"""The main job's training loop, this tree against an earlier commit, in one run on this machine.

    python scripts/bench_main_job.py --baseline e2a7d45 --rounds 2

Checks the baseline out as a git worktree (with its own ``.venv``, made by its ``scripts/setup_env.sh``)
and runs ``scripts/train.py`` from memory (``bench_utils.train_job``: 2 CPU ranks, SP = 2, ZeRO-2)
for each model, alternating the two trees every round; prints the best ``train_seconds`` of each and
their ratio. It tells apart a machine that got slower from code that did.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from bench_utils import ROOT, print_table, train_job


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", nargs="+", default=["c2d=200", "i3d=150"], help="MODEL=STEPS for each model run")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [(m, int(s)) for m, s in (spec.split("=") for spec in args.steps)]
    with tempfile.TemporaryDirectory(prefix="bench_main_job_") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline], cwd=ROOT, check=True)
        try:
            subprocess.run(["bash", "scripts/setup_env.sh", "deepspeed,train"], cwd=base, check=True,
                           stdout=subprocess.DEVNULL)
            trees = {"baseline": (base, base / ".venv/bin"), "this tree": (ROOT, None)}
            best: dict[tuple[str, str], float] = {}
            for r in range(args.rounds):
                for name, (tree, bin_dir) in trees.items():
                    for model, steps in runs:
                        out = Path(tmp) / f"{r}-{name.replace(' ', '_')}-{model}"
                        s = train_job(out, model, steps, tree=tree, bin_dir=bin_dir)["train_seconds"]
                        best[name, model] = min(s, best.get((name, model), float("inf")))
                        print(f"round {r + 1}: {name} {model} {steps} steps: {s:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    rows = [[model, steps, best["baseline", model], best["this tree", model],
             f"{best['this tree', model] / best['baseline', model]:.2f}x"] for model, steps in runs]
    print_table(f"baseline {args.baseline}; best of {args.rounds}, alternated",
                ["model", "steps", "baseline loop (s)", "this tree loop (s)", "this tree / baseline"], rows)


if __name__ == "__main__":
    main()
