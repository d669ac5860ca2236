"""torch.func's transforms refuse sharded activations.

``vmap`` (and ``jacrev``/``jacfwd``/``hessian`` on it), the grad-level transforms (``grad``,
``grad_and_value``, ``vjp``) and ``functionalize`` wrap their inputs in C++ with no
``__torch_function__`` call: a ``ShardedTensor`` went in as its bare local shard, and the function
computed on one rank's piece (a sum over the sharded dim summed the piece alone), silently. Each
transform's one entry for its inputs is wrapped here to refuse them instead, the same on every rank
(the check reads only the inputs' types): ``torch._functorch.apis.vmap_impl``,
``torch._functorch.eager_transforms._wrap_all_tensors`` and ``_wrap_all_tensors_to_functional``, all
private, looked up at call time by every public form of them however it was imported; a torch that
lacks one is left as it is. ``jvp`` already meets the rules (``_make_dual`` is refused). A shard
captured by a transformed function (not an input) is refused by the dispatcher
(``tensor._functorch_level``).
"""
from __future__ import annotations

import functools
import importlib

from nonlocal_dist.sharded.tensor import ShardingRefusal, holds_sharded, user_frame


def _refuse_sharded(name: str, values) -> None:
    if holds_sharded(values):
        raise ShardingRefusal(
            f"torch.func's {name} over a sharded activation at {user_frame()}: it unwraps it into this rank's local "
            "shard, so the function would see one rank's piece. Fix: gather it whole first "
            "(nonlocal_dist.sharded.full_tensor), or write the function with batched torch ops and "
            "torch.autograd")


def _guard(module: str, attribute: str, name: str, inputs) -> None:
    """Wrap ``module.attribute`` to refuse sharded values among ``inputs(*args, **kwargs)``."""
    try:
        owner = importlib.import_module(module)
    except ImportError:
        return
    plain = getattr(owner, attribute, None)
    if plain is None or getattr(plain, "_refuses_shards", False):
        return

    @functools.wraps(plain)
    def refusing(*args, **kwargs):
        _refuse_sharded(name, inputs(*args, **kwargs))
        return plain(*args, **kwargs)

    refusing._refuses_shards = True
    setattr(owner, attribute, refusing)


_guard("torch._functorch.apis", "vmap_impl", "vmap (or a transform built on it)",
       lambda func, in_dims, out_dims, randomness, chunk_size, *args, **kwargs: (args, kwargs))
_guard("torch._functorch.eager_transforms", "_wrap_all_tensors", "grad, grad_and_value or vjp",
       lambda tree, level: tree)
_guard("torch._functorch.eager_transforms", "_wrap_all_tensors_to_functional", "functionalize",
       lambda tree, level, **kwargs: tree)
