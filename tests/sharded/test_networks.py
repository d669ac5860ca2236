"""Networks written for one device in the styles of real ones (tests/zoo.py), run unchanged on sharded
activations: each is exact against the single-process network in float64 (output, input gradient,
every parameter gradient, every buffer), or refused on every rank with the op and the zoo's line."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from sharded_parity import assert_parity, reference, sharded_run
from zoo import ZOO

from nonlocal_dist.sharded import ShardingRefusal
from nonlocal_dist.testing import run_ranks

# Stride of each network along t (its shard lengths are multiples of it but the last).
ALIGN = {"UNet3D": 4, "TinyVideoTransformer": 2, "SlowFastStyle": 4}
# Networks refused on purpose (name -> the start of the refusal); none today.
REFUSED: dict[str, str] = {}


def _outcomes(rank, world, mesh_shape, names=None, split=None):
    if mesh_shape is None:
        mesh, axes = dist.group.WORLD, "t"
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh, axes = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("t", "h")), ("t", "h")
    outcomes = {}
    for name, (make, shape) in ZOO.items():
        if names is not None and name not in names:
            continue
        torch.manual_seed(0)
        model = make().double()
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = reference(copy.deepcopy(model), x)
        try:
            got = sharded_run(copy.deepcopy(model), x, mesh, axes, **(split or {"align": ALIGN.get(name, 1)}))
        except ShardingRefusal as exc:
            outcomes[name] = f"refused: {exc}"
            continue
        outcomes[name] = _parity(want, got)
    return outcomes


def _parity(want, got) -> str:
    try:
        assert_parity(want, got)
    except AssertionError as exc:
        return f"WRONG: {exc}"
    return "exact"


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
    names = ("S3DHead", "X3DSqueezeExcite", "CausalConvNet", "UNet3D")
    _check(run_ranks(_outcomes, 4, (2, 2), names, timeout=300))


def test_unet_with_an_empty_middle_rank():
    """8 frames on 3 ranks as (4, 0, 4): the pooled path, the upsampled decoder and the skips keep the
    empty middle rank, and the upsampled outputs line up with the skips (integer-factor ownership)."""
    _check(run_ranks(_outcomes, 3, None, ("UNet3D",), {"sizes": [[4, 0, 4]]}, timeout=300))


def _resharded(rank, world):
    """Operands split differently over one group: reshard to the first operand's split, exact."""
    from nonlocal_dist.sharded import distribute, full_tensor

    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 3, 8, 2, dtype=torch.float64, generator=gen) for _ in range(2))
    w = torch.randn(2, 6, 8, 2, dtype=torch.float64, generator=gen)
    want_a, want_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    ((want_a * want_b).repeat(1, 2, 1, 1) * w).sum().add((torch.cat([want_a, want_b], 1) * w).sum()).backward()
    got_a, got_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    sa = distribute(got_a, dist.group.WORLD, "b c t h", "t", sizes=[[4, 3, 1]])
    sb = distribute(got_b, dist.group.WORLD, "b c t h", "t", sizes=[[2, 2, 4]])
    prod, joined = sa * sb, torch.cat([sa, sb], 1)
    splits = (prod.spec.sharded[2].sizes, joined.spec.sharded[2].sizes)
    loss = (full_tensor(prod).repeat(1, 2, 1, 1) * w).sum() + (full_tensor(joined) * w).sum()
    loss.backward()
    grads = [g.clone() for g in (got_a.grad, got_b.grad)]
    for g in grads:
        dist.all_reduce(g)
        g /= world  # every rank computed the whole loss
    err = max((g - r.grad).abs().max().item() for g, r in zip(grads, (want_a, want_b)))
    return splits, err


def test_operands_split_differently_are_resharded():
    for splits, err in run_ranks(_resharded, 3, timeout=120):
        assert splits == ((4, 3, 1), (4, 3, 1)) and err < 1e-12, (splits, err)


class _NonLocalNet(torch.nn.Module):
    """conv + BN + ReLU, a non-local block over (t, h, w) with sub-sampling, conv, mean head, Linear."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        from nonlocal_dist import NonLocalBlock

        self.stem = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU())
        self.block = NonLocalBlock(8, mode=mode, sub_sample={"h": 2, "w": 2})
        torch.nn.init.ones_(self.block.norm.weight)  # open the block (it starts as the identity)
        self.conv = torch.nn.Conv3d(8, 8, (3, 3, 1), padding=(1, 1, 0))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.conv(self.block(self.stem(x))).mean(dim=(2, 3, 4)))


def _block_on_mesh(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("t", "h"))
    outcomes = {}
    for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        torch.manual_seed(0)
        model = _NonLocalNet(mode).double()
        x = torch.randn(2, 2, 6, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        want = reference(copy.deepcopy(model), x)
        outcomes[mode] = _parity(want, sharded_run(copy.deepcopy(model), x, mesh, ("t", "h"), sizes=[[4, 2], [2, 6]]))
    return outcomes


def test_nonlocal_block_over_a_2x2_mesh():
    """The block's positions sharded over t and h at once (uneven, pooled windows within each rank):
    one group spans the mesh, exact in every mode."""
    _check(run_ranks(_block_on_mesh, 4, timeout=300))


def _block_on_mesh_off_the_pool_grid(rank, world):
    torch.manual_seed(0)  # the same weights on every rank (parallelize checks them)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("t", "h"))
    x = torch.randn(1, 2, 6, 8, 4, dtype=torch.float64)
    try:
        sharded_run(_NonLocalNet("embedded_gaussian").double(), x, mesh, ("t", "h"), sizes=[[4, 2], [3, 5]])
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_nonlocal_block_over_a_mesh_refuses_pooling_across_ranks():
    for message in run_ranks(_block_on_mesh_off_the_pool_grid, 4, timeout=120):
        assert "pools shard axis t h by (1, 2)" in message and "not all divisible" in message, message
