"""Print the comparison table of the training runs whose results lie in a run directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="directory holding the <run>.json files written by scripts/train.py")
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in sorted(Path(args.run_dir).glob("*.json"))]
    finished = [r for r in results if r.get("finished")]
    if not finished:
        raise SystemExit(f"no finished run in {args.run_dir}")
    print("\n| run | steps | train accuracy | held-out accuracy | held-out loss | training loop (s) | W&B run |")
    print("|---|---|---|---|---|---|---|")
    for r in finished:
        seconds = r.get("train_seconds", "-")  # absent from the results of older runs
        print(f"| {r['name']} | {r['history'][-1]['step']} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} "
              f"| {r['test_loss']:.3f} | {seconds} | {r.get('wandb_dir') or '-'} |")


if __name__ == "__main__":
    main()
