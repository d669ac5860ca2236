"""Sanity checks for the single-device model zoo in ``tests/zoo.py``."""

from __future__ import annotations

import pytest
import torch

from zoo import ZOO

SEED = 1234


def _build(name: str) -> torch.nn.Module:
    ctor, _ = ZOO[name]
    torch.manual_seed(SEED)
    return ctor().to(torch.float64).train()


def _input(name: str) -> torch.Tensor:
    _, shape = ZOO[name]
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_zoo_registry() -> None:
    assert len(ZOO) == 8
    for name, (ctor, shape) in ZOO.items():
        assert callable(ctor), name
        assert len(shape) == 5, name
        assert shape[2] >= 8 and shape[3] >= 16, name
        assert ctor.__doc__, f"{name} needs a docstring naming its style"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_forward_backward(name: str) -> None:
    model = _build(name)
    x = _input(name).requires_grad_(True)
    out = model(x)
    assert out.dtype == torch.float64
    assert tuple(out.shape) == model.output_shape(tuple(x.shape)), name
    assert torch.isfinite(out).all(), name

    g = torch.Generator().manual_seed(SEED + 2)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad_out)
    assert x.grad is not None and torch.isfinite(x.grad).all(), name
    assert x.grad.abs().sum() > 0, name
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname}"

    # Deterministic: a second build with the same seed gives identical outputs.
    model2 = _build(name)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), f"{name}.{n1}"
    out2 = model2(x.detach())
    assert torch.equal(out.detach(), out2.detach()), name
