"""One parity check for networks run on sharded activations: a float64 model, parallelized over real
gloo ranks, against the same model in one process: outputs, input gradient, every parameter gradient
(summed over ranks) and every buffer (running statistics)."""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
import torch.distributed as dist

from nonlocal_dist.sharded.distribute import parallelize

TOL = 1e-9


def reference(model: torch.nn.Module, x: torch.Tensor, weight_seed: int = 7):
    """Single-process float64 forward/backward: (output, input grad, param grads, buffers)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=out.dtype)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad.clone(), grads, buffers


def sharded_run(model: torch.nn.Module, x: torch.Tensor, mesh, axes, steps: int = 1, weight_seed: int = 7, **kw):
    """The same on this rank, the model parallelized; gradients summed over the world."""
    model = parallelize(model, mesh, axes, **kw)
    world = dist.get_world_size()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=out.dtype)
        ((out * w).sum() / world).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    xg = xr.grad.clone()
    dist.all_reduce(xg)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), xg, grads, buffers


def module_parity(cls, shape: tuple, mesh, axes, **kw) -> bool:
    """``cls()`` (torch seed 0, float64) on a float64 input of ``shape`` (seed 1), in one process and
    parallelized over ``axes`` (``parallelize``'s keywords in ``kw``): ``assert_parity``, then True."""
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_parity(reference(copy.deepcopy(model), x), sharded_run(model, x, mesh, axes, **kw))
    return True


def assert_parity(ref, got, tol: float = TOL) -> None:
    names = ("output", "input grad")
    for name, a, b in zip(names, ref[:2], got[:2]):
        assert a.shape == b.shape, f"{name}: shape {tuple(b.shape)} vs {tuple(a.shape)}"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= tol * max(1.0, a.abs().max().item()), f"{name}: max abs err {err}"
    assert ref[2].keys() == got[2].keys(), f"parameters with grads differ: {set(ref[2]) ^ set(got[2])}"
    for n in ref[2]:
        err = (ref[2][n] - got[2][n]).abs().max().item()
        assert err <= tol * max(1.0, ref[2][n].abs().max().item()), f"grad {n}: max abs err {err}"
    for n in ref[3]:
        a, b = ref[3][n], got[3][n]
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * max(1.0, a.double().abs().max().item()), f"buffer {n}: max abs err {err}"


@contextlib.contextmanager
def runtime_log():
    """The messages the runtime logs (logger ``nonlocal_dist.sharded``, INFO: its reshards) in the block."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("nonlocal_dist.sharded")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
