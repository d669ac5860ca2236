"""Position-wise ops: elementwise math, activations, casts, broadcasting with plain tensors.

Broadcasting follows the global shapes. Along a dim that the output shards, every other operand
must be sharded alike (an operand split differently over the same group and global length is
resharded to the first sharded operand's split, one all-to-all), or have length 1 there (it broadcasts), or be a plain/replicated tensor of
the global length (a positional embedding, a per-frame weight): it is sliced to this rank's part.
Any other length is refused: it would be read as the wrong positions.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from nonlocal_dist.sharded.rng import check_agreed, shard_seeded
from nonlocal_dist.sharded.rules.common import (
    bind,
    localise,
    one_dim_per_group,
    output_dims,
)
from nonlocal_dist.sharded.tensor import (
    FAMILIES,
    Op,
    ShardedTensor,
    inplace_target,
    map_leaves,
    replicated_or_refuse,
    rule,
)

_UNARY = [
    "abs", "neg", "negative", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "sin", "cos",
    "tan", "tanh", "sigmoid", "relu", "erf", "erfc", "reciprocal", "sign", "sgn", "floor", "ceil", "round", "trunc",
    "frac", "square", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "isfinite", "isnan", "isinf",
    "logical_not", "bitwise_not", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "logit",
    "positive", "signbit", "deg2rad", "rad2deg", "float_power", "threshold",
]
_BINARY = [
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "maximum", "minimum", "fmax", "fmin", "atan2", "where", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt",
    "le", "gt", "ge", "greater", "less", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "masked_fill", "copysign", "hypot", "xlogy", "isclose", "heaviside",
]
_DUNDER = [
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__floordiv__", "__rfloordiv__",
    "__ifloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__ipow__", "__neg__", "__abs__", "__pos__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__rand__", "__iand__", "__or__",
    "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__", "__invert__", "__lshift__", "__rshift__",
]
# Casts and copies that keep every position where it is.
_SAME = [
    "float", "double", "half", "bfloat16", "int", "long", "bool", "to", "type", "type_as", "contiguous", "clone",
    "detach", "detach_", "requires_grad_", "cpu", "cuda", "zero_", "fill_", "copy_", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like", "bernoulli", "bernoulli_", "normal_", "uniform_",
    "pin_memory", "share_memory_", "retain_grad", "abs_", "neg_", "exp_", "relu_", "sigmoid_", "tanh_", "clamp_",
    "clamp_min_", "clamp_max_", "mul_", "add_", "sub_", "div_", "masked_fill_", "nan_to_num_",
    "sqrt_", "rsqrt_", "pow_", "lerp_", "addcmul_", "addcdiv_", "floor_", "ceil_", "round_", "sign_", "erf_",
    "square_", "log_", "reciprocal_", "where_", "threshold_",
]
_FUNCTIONAL = [
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "elu",
    "elu_", "selu", "celu", "leaky_relu", "leaky_relu_", "softplus", "softsign", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "threshold", "threshold_", "sigmoid", "tanh",
]


def _targets():
    for name in _UNARY + _BINARY + _SAME:
        for owner in (torch, Tensor):
            if hasattr(owner, name):
                yield getattr(owner, name)
            if hasattr(owner, name + "_"):
                yield getattr(owner, name + "_")
    for name in _DUNDER:
        if hasattr(Tensor, name):
            yield getattr(Tensor, name)
    for name in _FUNCTIONAL:
        if hasattr(F, name):
            yield getattr(F, name)


def broadcast_rule(op: Op):
    """Elementwise ops over operands broadcast by their global shapes."""
    if op.func in (torch.where, Tensor.where) and len(op.args) + len(op.kwargs) == 1:
        if not any(t.spec.dims for t in op.sharded()):
            return replicated_or_refuse(op)
        raise op.refuse("torch.where(condition) gives the indices of the nonzero elements (torch.nonzero), "
                        "which each rank would count from its own piece", fix="call it where the tensor is whole "
                        "(full_tensor), or use the three-argument torch.where(condition, x, y)")
    tensors = op._tensors()
    # The op runs on the sharded operands themselves, not on aliases (an alias adds a node per op to
    # the backward graph): torch functions are off inside a rule, so a builtin sees the local tensors.
    if (len(tensors) == 1 and op.args and op.args[0] is tensors[0]) or _sharded_alike(op, tensors):
        # relu, a cast, x * 2.0 (no broadcasting); a residual sum, a gate (operands split alike)
        x = tensors[0]
        out = op.run(*op.args, **op.kwargs)
        if isinstance(out, ShardedTensor):  # an operand given back (in place, a cast to its own type)
            return out
        return _wrap_outputs(out, x.spec, x.dim(), [])
    ndim = max(t.dim() for t in tensors)
    x, inplace = _lone_sharded(tensors, ndim), inplace_target(op)
    if x is not None and (inplace is None or inplace is x):
        # one sharded operand, the others plain (a rotary table, a bias): its dims are the result's
        dims, spec = x.spec.sharded, x.spec
    else:
        op = one_dim_per_group(op, ndim)
        tensors = op.tensors()
        dims = output_dims(op, ndim)
        inplace = inplace_target(op)
        if inplace is not None and not isinstance(inplace, ShardedTensor) and dims:
            raise op.refuse("an in-place op would write sharded values into a plain tensor",
                            fix="use the out-of-place op")
        spec = op.sharded()[0].spec.remap(ndim, dims)
        if isinstance(inplace, ShardedTensor) and dict(inplace.spec.dims) != {d - ndim + inplace.dim(): s for d, s in dims.items()}:
            raise op.refuse("an in-place op would change which positions its target holds", fix="use the out-of-place op")
    args = map_leaves(lambda t: localise(op, t, dims, ndim), op.args)
    kwargs = map_leaves(lambda t: localise(op, t, dims, ndim), op.kwargs)
    out = op.run(*args, **kwargs)
    if inplace is not None:
        return inplace
    return _wrap_outputs(out, spec, ndim, [t for t in tensors if not isinstance(t, ShardedTensor)])


def _lone_sharded(tensors: list[Tensor], ndim: int) -> ShardedTensor | None:
    """The one sharded operand where it has the most dims (``ndim``) and every other is plain: the
    result is split as it is, with no planning (``one_dim_per_group``, ``output_dims``); else None."""
    x = None
    for t in tensors:
        if isinstance(t, ShardedTensor):
            if x is not None:
                return None
            x = t
    return x if x is not None and x.dim() == ndim else None


def _sharded_alike(op: Op, tensors: list[Tensor]) -> bool:
    """Whether every tensor operand is a top-level argument, sharded, of one rank and split alike (the
    same dims, groups and sizes): the op then runs on the pieces as they are."""
    first = tensors[0]
    if not isinstance(first, ShardedTensor):
        return False
    spec, ndim = first.spec, first.dim()
    for t in tensors[1:]:  # loops, not generators: this runs for every residual sum
        if not isinstance(t, ShardedTensor) or t.dim() != ndim or not spec.split_alike(t.spec):
            return False
    top = 0
    for a in op.args:
        top += isinstance(a, Tensor)
    for a in op.kwargs.values():
        top += isinstance(a, Tensor)
    return top == len(tensors)


def _wrap_outputs(out, spec, ndim: int, plain: list[Tensor]):
    """Every tensor output (but a plain operand returned as it is) sharded by ``spec`` (of ``ndim`` dims),
    its dims right-aligned to the output's."""
    if type(out) is Tensor and out.dim() == ndim and not any(out is p for p in plain):  # the usual result
        return ShardedTensor.wrap(out, spec)

    def wrap(t):
        if not isinstance(t, Tensor) or any(t is p for p in plain):
            return t
        if t.dim() == ndim:
            return ShardedTensor.wrap(t, spec)
        return ShardedTensor.wrap(t, spec.remap(t.dim(), {d - ndim + t.dim(): s for d, s in spec.dims}))

    return map_leaves(wrap, out)


for _func in set(_targets()):
    rule(_func, any_operand=True)(broadcast_rule)


@functools.cache
def _tagged_pointwise(name: str) -> bool:
    """Whether torch tags the ATen op ``name`` element-wise (``torch.Tag.pointwise``: broadcasting,
    each output element from the same elements of the inputs; random ops are not tagged so)."""
    try:
        packet = getattr(torch.ops.aten, name)
        overloads = [getattr(packet, name) for name in packet.overloads()]
    except (AttributeError, RuntimeError):
        return False
    # Every overload on tensors (not the out= forms, nor those on Python numbers, which torch leaves
    # untagged): ``max``'s binary overload is element-wise, its others reduce.
    tags = [o.tags for o in overloads if not o._schema.name.endswith("_out") and o._overloadname != "out"
            and any("Tensor" in str(a.type) for a in o._schema.arguments)]
    return bool(tags) and all(torch.Tag.pointwise in t for t in tags)


def _pointwise_family(func) -> object:
    """The broadcast rule for any function torch declares element-wise (``torch.special.*``, the
    rarer unary and binary ops), with no hand-written entry."""
    name = getattr(func, "__name__", "")
    return broadcast_rule if name and not name.startswith("_") and _tagged_pointwise(name) else None


FAMILIES.append(_pointwise_family)


# Random ops (sharded.rng): a sharded activation draws from its shard's own seed; a replicated
# value from the generator every rank's parallelized forward agreed on.
_RANDOM_NAMES = ("rand_like", "randn_like", "bernoulli", "bernoulli_", "normal_", "uniform_")


def _shard_offsets(x: ShardedTensor) -> tuple[int, ...]:
    return tuple(v for d, shard in x.spec.dims for v in (d, shard.start))


def _draws_alike(x: ShardedTensor) -> bool:
    """Whether some rank holds the same positions as another (a dim of the mesh shards nothing):
    those ranks must draw alike, from the agreed generator."""
    used = {id(shard.group) for _, shard in x.spec.dims}
    used |= {id(s.group) for _, shard in x.spec.dims if shard.merged for s in (shard.merged.outer, shard.merged.inner)}
    return any(id(g) not in used for g in x.spec.groups)


def _drawing(op: Op, x: ShardedTensor, alike: bool):
    """Where a random op on ``x`` draws: from the agreed generator where every rank must draw the same
    numbers (``alike``: one mask per sample and channel; or ranks holding the same positions), else
    from the shard's own seed."""
    if alike or _draws_alike(x):
        check_agreed(op, x.device)
    if alike or x.spec.replicated:
        return contextlib.nullcontext()
    return shard_seeded(_shard_offsets(x), x.device)


def random_rule(op: Op):
    """A position-wise random op: independent draws per shard, the same draws where replicated."""
    x = op.sharded()[0]
    with _drawing(op, x, alike=False):
        return broadcast_rule(op)


for _name in _RANDOM_NAMES:
    for _owner in (torch, Tensor):
        if hasattr(_owner, _name):
            rule(getattr(_owner, _name))(random_rule)


def _dropout_ref(input, p=0.5, training=True, inplace=False):
    """Signature of F.dropout and its channel variants."""


def _dropout(op: Op):
    """Dropout of every kind, run on the local tensor: an element-wise mask from the shard's own
    seed; a channel mask (one per sample and channel, whatever positions a rank holds) from the
    agreed generator, so every rank draws the same one."""
    a = bind(op, _dropout_ref)
    x = a["input"]
    if not a["training"] or a["p"] == 0.0:
        return x
    channel = op.func.__name__ in ("dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout")
    local = x.as_subclass(Tensor)
    if channel and any(d < (2 if x.dim() > 2 else 1) for d, _ in x.spec.dims):
        raise op.refuse("channel dropout with the batch or channel dim sharded")
    with _drawing(op, x, alike=channel):
        if channel and not local.numel():  # torch draws nothing for an empty tensor: draw the mask anyway,
            # so this rank's generator stays in step with the others' (one mask per sample and channel)
            local.new_empty(local.shape[:2] + (1,) * (local.dim() - 2)).bernoulli_(1 - a["p"])
        out = op.run(local, a["p"], True, a["inplace"])
    return x if a["inplace"] else ShardedTensor.wrap(out, x.spec)


for _name in ("dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"):
    rule(getattr(F, _name))(_dropout)


@rule(Tensor.type_as, any_operand=True)
def _type_as(op: Op):
    """``x.type_as(other)`` takes only ``other``'s type: x keeps its positions and spec, whatever
    ``other``'s shape or sharding (Wan casts attention outputs to the queries' type)."""
    return _cast_like(op)


@rule(Tensor.to, any_operand=True)
def _to(op: Op):
    """``x.to(other)`` takes only ``other``'s dtype and device, as ``type_as``; ``x.to(dtype)``,
    ``x.to(device)`` are position-wise."""
    if any(isinstance(a, Tensor) for a in (*op.args[1:], *op.kwargs.values())):
        return _cast_like(op)
    return broadcast_rule(op)


def _cast_like(op: Op):
    """The op on the shards as they are (torch functions are off in a rule: no alias node in the
    backward graph); the result keeps the first argument's positions and spec (the other tensor gives
    only its dtype and device, whatever its shape or sharding)."""
    x = op.args[0]
    out = op.run(*op.args, **op.kwargs)
    if out is x or not isinstance(x, ShardedTensor):  # x already of that type (torch gives it back), or plain
        return out
    return ShardedTensor.wrap(out, x.spec)
