"""The collectives one training step of the main job's I3D issues on each sequence-parallel rank, listed.

The model is ``scripts/train.py``'s (``configs/experiment_i3d.json``: ``I3DNonLocal`` with its
non-local blocks, ``parallelize(model, group, "t")``), one micro-batch of the config's clips, sharded
over 2 gloo ranks. One step: forward, cross-entropy, backward, SGD update. Every c10d call is counted
by kind and by the function of this package that issued it (the innermost ``nonlocal_dist`` frame),
forward and backward apart; the first step (which also checks the parameters) is not counted.
DeepSpeed's own optimizer collectives (ZeRO's gradient reduction over the data-parallel group) are
not in the model and not listed.

    python scripts/count_collectives.py [--world 2] [--micro-batch 32]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench_utils import print_table, spawn_ranks
from nonlocal_dist import parallelize
from nonlocal_dist.models import I3DNonLocal

ROOT = Path(__file__).resolve().parent.parent
_KINDS = ("all_gather", "all_gather_object", "all_reduce", "all_to_all", "all_to_all_single", "batch_isend_irecv",
          "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single",
          "broadcast", "barrier")


def _caller() -> str:
    """``module.qualname`` of the innermost frame of this package above its primitives (``distributed``:
    the raw calls and their autograd forms; ``sharded.extend``: its ``Function.apply`` wrapper), i.e. the
    rule, exchange or block that asked for the call; or the backward of a primitive's autograd node,
    which autograd's engine runs with no caller of this package."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("nonlocal_dist."):
            name = f"{module.removeprefix('nonlocal_dist.')}.{frame.f_code.co_qualname}"
            if not module.startswith(("nonlocal_dist.distributed.", "nonlocal_dist.sharded.extend")):
                return name
            if frame.f_code.co_name == "backward":
                return name
        frame = frame.f_back
    return "(outside this package)"


class _Counter:
    """Counts every c10d call by (phase, kind, caller) while installed; the comm module's bound
    aliases of the one-tensor collectives are patched too."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.phase = "forward"

    def __enter__(self):
        import nonlocal_dist.distributed.comm as comm

        self.saved = []
        targets = [(dist, name) for name in _KINDS if hasattr(dist, name)]
        targets += [(comm, name) for name in ("_all_gather", "_reduce_scatter")]
        for owner, name in targets:
            fn = getattr(owner, name)
            self.saved.append((owner, name, fn))
            setattr(owner, name, self._counted(fn, name.strip("_")))
        return self

    def _counted(self, fn, kind: str):
        def call(*args, **kwargs):
            self.counts[(self.phase, kind, _caller())] += 1
            return fn(*args, **kwargs)
        return call

    def __exit__(self, *exc) -> None:
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)


def _rank(rank: int, world: int, args, group) -> list:
    exp = json.loads((ROOT / "configs/experiment_i3d.json").read_text())
    m, d = dict(exp["model"]), exp["data"]
    m.pop("name")
    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    model = parallelize(I3DNonLocal(in_channels=1, num_classes=2, **m), group, axis="t").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.micro_batch, 1, d["frames"], d["size"], d["size"], generator=gen)
    y = torch.randint(0, 2, (args.micro_batch,), generator=gen)

    def step(counter: _Counter | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) / world  # each rank's loss / group size (the project's convention)
        if counter is not None:
            counter.phase = "backward"
        loss.backward()
        optimizer.step()

    step(None)
    with _Counter() as counter:
        step(counter)
    return sorted((phase, kind, caller, n) for (phase, kind, caller), n in counter.counts.items())


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="sequence-parallel ranks (gloo, 1 thread each)")
    parser.add_argument("--micro-batch", type=int, default=32, help="clips per step (the config's micro_batch)")
    args = parser.parse_args(argv)
    per_rank = spawn_ranks(_rank, args.world, args)
    if any(rows != per_rank[0] for rows in per_rank.values()):
        raise SystemExit(f"the ranks issued different collectives: {per_rank}")
    rows = [[phase, kind, caller, n] for phase, kind, caller, n in per_rank[0]]
    total = sum(r[3] for r in rows)
    rows.append(["all", "", "", total])
    print_table(f"Collectives per training step of the main job's I3D, on each of {args.world} ranks "
                f"(micro-batch {args.micro_batch}; every rank issued the same list)",
                ["phase", "c10d call", "issued by (nonlocal_dist.)", "calls"], rows)
    return rows


if __name__ == "__main__":
    main()
