"""``torch.autograd.grad`` with sharded inputs: each gradient comes back sharded as its input.

Each rank's local gradient of its piece of a sharded input is that piece of the whole gradient (the
collectives' backwards send every position's gradient to the rank that holds it), so the rule runs
torch's function on the local tensors and gives each gradient its input's spec, as ``x.grad`` after
``backward()`` has it. Before this rule, the gradient came back as a plain tensor of the local
shape: ``g.sum()`` summed one rank's piece. A replicated input's gradient keeps its (replicated)
spec, as ``.grad`` does: it is this rank's share, summed over ranks as parameters' are.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from nonlocal_dist.sharded.tensor import Op, ShardedTensor, rule


@rule(torch.autograd.grad, any_operand=True)
def _grad(op: Op):
    named = inspect.signature(op.func).bind(*op.args, **op.kwargs).arguments
    if named.get("is_grads_batched"):
        raise op.refuse("is_grads_batched runs the backward under vmap, which would see each rank's piece alone",
                        fix="call torch.autograd.grad once per vector of grad_outputs")
    inputs = named["inputs"]
    grads = op.run(*op.args, **op.kwargs)
    wanted = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    return tuple(ShardedTensor.wrap(g, x.spec)
                 if isinstance(x, ShardedTensor) and isinstance(g, Tensor) and g.shape == x.shape else g
                 for x, g in zip(wanted, grads))
