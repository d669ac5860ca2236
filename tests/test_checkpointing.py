"""apply_activation_checkpointing: the non-local blocks recompute in the backward, exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nonlocal_dist import NonLocalBlock
from nonlocal_dist.checkpointing import apply_activation_checkpointing
from nonlocal_dist.models import I3DNonLocal


def _model() -> I3DNonLocal:
    torch.manual_seed(0)
    model = I3DNonLocal(2, 3, stem_channels=4, stem_stride=1, widths=(8, 8), depths=(1, 2), strides=(1, 2),
                        inflate=((1,), (1, 0)), nonlocal_stages=((1,), (0, 1))).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NonLocalBlock):
                m.norm.weight.fill_(0.7)  # leave the identity so that every block parameter has a gradient
    return model


def _count_attends(model) -> list[int]:
    """Calls of each block's attention, counted on the instance (the recomputation calls it too)."""
    counts = []
    for block in (m for m in model.modules() if isinstance(m, NonLocalBlock)):
        counts.append(0)
        index, attend = len(counts) - 1, block.attend

        def counted(*args, index=index, attend=attend):
            counts[index] += 1
            return attend(*args)

        block.attend = counted
    return counts


def _step(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("kind", ["torch", "deepspeed"])
def test_gradients_and_statistics_unchanged_and_blocks_recomputed(kind):
    if kind == "deepspeed":
        pytest.importorskip("deepspeed")
    plain = _model()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain), kind)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 2, 4, 8, 8, dtype=torch.float64, generator=gen), torch.tensor([0, 2])
    # deepspeed's (reentrant) checkpoint gives gradients only when its input requires them.
    x = x.requires_grad_(kind == "deepspeed")
    counts = _count_attends(checkpointed)
    for _ in range(2):
        (grads, buffers), (ref_grads, ref_buffers) = _step(checkpointed, x, y), _step(plain, x, y)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-12, atol=1e-14, msg=name)
        for name, ref in ref_buffers.items():  # running statistics updated once per step, not twice
            torch.testing.assert_close(buffers[name], ref, rtol=1e-12, atol=1e-14, msg=name)
    assert counts == [4, 4], "each block runs twice per step: forward and recomputation"
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), plain.eval()(x), rtol=1e-12, atol=1e-14)
    assert counts == [5, 5], "no recomputation outside training"


def test_names_kept_and_second_application_refused():
    model = apply_activation_checkpointing(_model())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _model().named_parameters()]
    with pytest.raises(ValueError, match="checkpointed twice"):
        apply_activation_checkpointing(model)
    with pytest.raises(ValueError, match="kind must be one of"):
        apply_activation_checkpointing(_model(), "fairscale")
