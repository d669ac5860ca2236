"""Declaring your own ops to the sharded runtime (as DTensor's ``register_sharding``/``local_map``).

- ``register_rule(func, rule)``: ``rule(op)`` runs ``func`` on sharded activations (``op.args``,
  ``op.kwargs``, ``op.sharded()``, ``op.run(...)`` on local tensors, ``op.refuse(why, dim, fix)``;
  see the rules in ``sharded/rules``). For torch functions, Tensor methods and custom
  ``autograd.Function`` classes (``register_rule(Swish, rule)``).
- ``positionwise(func_or_Function, ...)``: declare that each output position depends on the same
  input position only (an activation, a per-position scale): it runs on each rank's shard, its
  outputs keep the input's sharding. Exact by that declaration; the runtime cannot check it.
- ``local_map(fn)``: wrap a Python function of yours the same way.

A custom ``autograd.Function`` applied to a sharded activation is refused in forward, naming it,
unless declared (its forward and backward are code the runtime cannot see as one op); one defined
by torch, DeepSpeed or this package (checkpointing, collectives) runs as before, each op inside
under its rule, and one that only meets replicated values runs as it is.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from nonlocal_dist.sharded.tensor import (
    Op,
    ShardedTensor,
    as_local,
    map_leaves,
    rule,
    run_rule,
)

# autograd.Function classes declared by the user -> their rule.
FUNCTION_RULES: dict[type, Callable[[Op], object]] = {}
_PASS_THROUGH = ("torch.", "deepspeed.", "nonlocal_dist.")


def register_rule(func, fn: Callable[[Op], object]) -> None:
    """Make ``fn(op)`` the rule of ``func`` (a torch function, a Tensor method, or an
    ``autograd.Function`` subclass) on sharded activations."""
    if isinstance(func, type) and issubclass(func, torch.autograd.Function):
        FUNCTION_RULES[func] = fn
    elif callable(func):
        rule(func, any_operand=True)(fn)
    else:
        raise TypeError(f"register_rule takes a torch function, a Tensor method or an autograd.Function class, "
                        f"got {func!r}")


def _positionwise_rule(op: Op):
    """Run on the local tensors; every tensor output sharded like the first sharded operand."""
    first = op.sharded()[0]
    mismatched = [t for t in op.sharded() if not first.spec.split_alike(t.spec)]
    if mismatched:
        raise op.refuse("a position-wise op whose operands are sharded differently",
                        fix="compute them from the same sharded input")
    out = op.run(*map_leaves(as_local, op.args), **map_leaves(as_local, op.kwargs))
    return map_leaves(lambda t: ShardedTensor.wrap(t, first.spec) if isinstance(t, Tensor) else t, out)


def positionwise(*funcs) -> None:
    """Declare each of ``funcs`` (torch functions, Tensor methods, ``autograd.Function`` classes)
    position-wise: run on each shard, outputs sharded like the input."""
    for func in funcs:
        register_rule(func, _positionwise_rule)


def local_map(fn: Callable) -> Callable:
    """``fn`` (a position-wise Python function) made to take sharded activations: it runs on each
    rank's shard and its tensor outputs keep the (first) input's sharding."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        sharded = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, ShardedTensor)]
        if not sharded:
            return fn(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return run_rule(Op(fn, args, kwargs), _positionwise_rule)

    return wrapped


# torch's own apply: a Python classmethod up to 2.13, a C classmethod descriptor from 2.14.
_TORCH_APPLY = torch.autograd.Function.__dict__["apply"]


def _plain_apply(cls, *args, **kwargs):
    return _TORCH_APPLY.__get__(None, cls)(*args, **kwargs)


@classmethod
def _apply(cls, *args, **kwargs):
    """``Function.apply`` that sends sharded activations to a declared rule, or refuses them."""
    sharded = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, ShardedTensor)]
    if not sharded or cls.__module__.startswith(_PASS_THROUGH):
        return _plain_apply(cls, *args, **kwargs)
    apply = functools.partial(_plain_apply, cls)
    functools.update_wrapper(apply, cls.forward)
    apply.__name__ = apply.__qualname__ = f"{cls.__qualname__}.apply"
    with torch._C.DisableTorchFunctionSubclass():
        op = Op(apply, args, kwargs)
        if cls in FUNCTION_RULES:
            return run_rule(op, FUNCTION_RULES[cls])
        if all(t.spec.replicated for t in sharded):
            return _plain_apply(cls, *args, **kwargs)
        raise op.refuse(
            f"custom autograd.Function {cls.__qualname__} runs code the runtime cannot see as one op",
            fix=f"declare it: nonlocal_dist.sharded.positionwise({cls.__qualname__}) if each output position "
                f"depends on the same input position only, or nonlocal_dist.sharded.register_rule("
                f"{cls.__qualname__}, rule)")


torch.autograd.Function.apply = _apply
