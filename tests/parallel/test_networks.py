"""Networks written for one device in the styles of real ones (tests/zoo.py), run unchanged on sharded
activations: each is exact against the single-process network in float64 (output, input gradient,
every parameter gradient, every buffer), or refused on every rank with the op and the zoo's line."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from dist_harness import run_ranks
from sharded_parity import assert_parity, reference, sharded_run
from zoo import ZOO
from nonlocal_dist.parallel import ShardingRefusal

# Stride of each network along t (its shard lengths are multiples of it but the last).
ALIGN = {"UNet3D": 4, "TinyVideoTransformer": 2, "SlowFastStyle": 4}
# The U-Net's trilinear upsampling owns its outputs by source position, its skip by stride: the
# concatenation of the two is refused (sharded differently) until interpolate follows the stride rule.
REFUSED = {"UNet3D": "torch.cat along sharded dim 2"}


def _outcomes(rank, world, mesh_shape):
    if mesh_shape is None:
        mesh, axes = dist.group.WORLD, "t"
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh, axes = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("t", "h")), ("t", "h")
    outcomes = {}
    for name, (make, shape) in ZOO.items():
        if mesh_shape is not None and name not in ("S3DHead", "X3DSqueezeExcite", "CausalConvNet"):
            continue
        torch.manual_seed(0)
        model = make().double()
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = reference(copy.deepcopy(model), x)
        try:
            got = sharded_run(copy.deepcopy(model), x, mesh, axes, align=ALIGN.get(name, 1))
        except ShardingRefusal as exc:
            outcomes[name] = f"refused: {exc}"
            continue
        try:
            assert_parity(want, got)
            outcomes[name] = "exact"
        except AssertionError as exc:
            outcomes[name] = f"WRONG: {exc}"
    return outcomes


def _check(results):
    for outcomes in results:
        for name, outcome in outcomes.items():
            if name in REFUSED:
                assert outcome.startswith(f"refused: {REFUSED[name]}") and "zoo.py" in outcome, (name, outcome)
            else:
                assert outcome == "exact", (name, outcome)
    assert len({tuple(sorted(o.items())) for o in results}) == 1  # every rank the same outcome


def test_zoo_on_two_ranks():
    _check(run_ranks(_outcomes, 2, None, timeout=300))


def test_zoo_on_a_2x2_mesh_over_t_and_h():
    _check(run_ranks(_outcomes, 4, (2, 2), timeout=300))
