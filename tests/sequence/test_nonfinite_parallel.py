"""Non-finite inputs through the sequence-parallel softmax strategies on 2 gloo ranks: the output
and the gradients follow the formula's NaN/inf pattern (torch's CPU flash kernel gives zeros for a
NaN query row with fewer than 16 keys), where the nodes decide the kernel once in the forward and
their backward reads only its incoming gradient for non-finite values."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import assert_same_pattern, nonfinite_case
from oracle import naive_nonlocal

from nonlocal_dist import nonlocal_op
from nonlocal_dist.testing import run_ranks


def _pattern(rank, world, strategy, kind):
    theta, phi, g = (t.unsqueeze(1).expand(-1, 2, -1, -1).contiguous() for t in nonfinite_case(kind, 7))  # 2 heads
    grad = torch.randn(*theta.shape[:-1], g.shape[-1], generator=torch.Generator().manual_seed(5))
    if kind == "nan gradient":
        grad[1, 0, 4, 1] = float("nan")
    whole = [t.double().requires_grad_() for t in (theta, phi, g)]
    want = naive_nonlocal(*whole, "embedded_gaussian", 0.5)
    want.backward(grad.double())
    mine = [t.tensor_split(world, dim=2)[rank].clone().requires_grad_() for t in (theta, phi, g)]
    y = nonlocal_op(*mine, "embedded_gaussian", scale=0.5, group=dist.group.WORLD, strategy=strategy)
    y.backward(grad.tensor_split(world, dim=2)[rank])
    failures = []
    for name, got, ref in zip(("y", "dtheta", "dphi", "dg"), (y, *(t.grad for t in mine)),
                              (want, *(t.grad for t in whole))):
        try:
            assert_same_pattern(got.detach(), ref.detach().tensor_split(world, dim=2)[rank], f"{strategy} {kind} {name}")
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    return failures


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("kind", ["nan query row", "inf value", "nan gradient"])
def test_non_finite_inputs_follow_the_formula_on_every_strategy(strategy, kind):
    for failures in run_ranks(_pattern, 2, strategy, kind, timeout=120):
        assert not failures, failures
