"""The main job's training loop, this tree against an earlier commit, in one run on this machine.

    python scripts/bench_main_job.py --baseline e2a7d45 --rounds 2

Checks the baseline out as a git worktree (with its own ``.venv``, made by its ``scripts/setup_env.sh``)
and runs ``scripts/train.py`` from memory (2 CPU ranks under the DeepSpeed launcher, SP = 2, ZeRO-2)
for each model, alternating the two trees every round; prints the best ``train_seconds`` of each and
their ratio. It tells apart a machine that got slower from code that did.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", nargs="+", default=["c2d=200", "i3d=150"], help="MODEL=STEPS for each model run")
    p.add_argument("--port", type=int, default=29611)
    return p.parse_args(argv)


def train_seconds(tree: Path, model: str, steps: int, out: Path, port: int) -> float:
    out.mkdir(parents=True)
    cmd = [str(tree / ".venv/bin/deepspeed"), "--num_gpus", "2", "--master_port", str(port), "scripts/train.py",
           "--model", model, "--deepspeed_config", "configs/ds_zero2.json", "--sp-size", "2", "--steps", str(steps),
           "--ckpt-dir", str(out / "ckpt"), "--run-dir", str(out), "--wandb", "disabled", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    with (out / "log").open("w") as log:
        code = subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
    if code:
        sys.exit(f"{tree} {model}: train.py exited {code}; see {out / 'log'}")
    (result,) = out.glob("*.json")
    return json.loads(result.read_text())["train_seconds"]


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [(m, int(s)) for m, s in (spec.split("=") for spec in args.steps)]
    with tempfile.TemporaryDirectory(prefix="bench_main_job_") as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline], cwd=ROOT, check=True)
        try:
            subprocess.run(["bash", "scripts/setup_env.sh", "deepspeed,train"], cwd=base, check=True,
                           stdout=subprocess.DEVNULL)
            trees = {"baseline": base, "this tree": ROOT}
            best: dict[tuple[str, str], float] = {}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    for model, steps in runs:
                        s = train_seconds(tree, model, steps, Path(tmp) / f"{r}-{name.replace(' ', '_')}-{model}", args.port)
                        best[name, model] = min(s, best.get((name, model), float("inf")))
                        print(f"round {r + 1}: {name} {model} {steps} steps: {s:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"\nbaseline {args.baseline}; best of {args.rounds}, alternated\n")
    print("| model | steps | baseline loop (s) | this tree loop (s) | this tree / baseline |")
    print("|---|---|---|---|---|")
    for model, steps in runs:
        b, t = best["baseline", model], best["this tree", model]
        print(f"| {model} | {steps} | {b:.1f} | {t:.1f} | {t / b:.2f}x |")


if __name__ == "__main__":
    main()
