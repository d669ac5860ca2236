"""``ShardedTensor``: an activation that carries its shard spec through every op.

Why ``__torch_function__`` (not ``__torch_dispatch__``): it sees each op as the network wrote it
(``F.conv3d`` with its padding, ``F.pad`` with its mode, ``F.interpolate``, ``torch.mean``), with the
user's frame on the stack to name in an error, and before autograd: every rule runs on the local
tensors with this package's differentiable collectives, so autograd records a plain graph and the
backward runs no Python dispatch at all. (A ``__torch_dispatch__`` tensor would need a sharding
rule for every backward aten op too, and sees ``F.pad(mode="reflect")`` only as its decomposition.)

The object *is* this rank's shard (its storage, its autograd history); ``spec`` says which dims are
split over which process groups and every rank's length there. The Python-visible ``shape``,
``size()``, ``numel()`` and ``len()`` are the global ones, as in DTensor, so a network that reads
sizes off its activations (``F.pad`` by ``x.shape[2]``, a positional embedding sliced to the
length) computes them globally; ``to_local()`` gives the shard as a plain tensor.

Every op either has a rule here (``RULES``, filled by ``nonlocal_dist.sharded.rules``) that runs it
partitioned and exact, or raises ``ShardingRefusal`` naming the op, the sharded dim and the user's
source line. Rules decide from the spec alone, which is the same on every rank, so a refusal is
raised by every rank at the same op: none is left waiting. An op whose tensors are all replicated
(no sharded dim) runs locally, unchanged, on every rank.
"""
from __future__ import annotations

import functools
import inspect
import linecache
import os
import sys
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

import nonlocal_dist.distributed.failure as failure
from nonlocal_dist.distributed.mesh import covered
from nonlocal_dist.sharded.arguments import bind, normalize
from nonlocal_dist.sharded.rng import check_agreed
from nonlocal_dist.sharded.spec import PositionsNeeded, ShardSpec

RULES: dict[Callable, Callable[[Op], object]] = {}
# Op families: each maps a function with no rule to the rule of its family, or None (sharded.rules
# fills it: e.g. every function whose ATen op torch tags ``pointwise``).
FAMILIES: list[Callable[[Callable], Callable[[Op], object] | None]] = []
_WRAPPED: dict[Callable, Callable] = {}  # this package's wrappers of torch functions -> the originals

_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (sys.modules["torch"], sys.modules[__name__.split(".", 1)[0]], sys.modules["contextlib"])
)  # torch, this package, and the standard library (a context manager's frame is not the user's line)


# The innermost torch.func transform level running (None outside every transform); private, so absent -> None.
_functorch_level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)


class ShardingRefusal(ValueError):
    """An op this runtime cannot run exactly on a sharded activation; raised on every rank alike."""

    raised_on_every_rank = True


ANY_OPERAND: set[Callable] = set()
# The models whose parallelized forward is running (``parallelize``'s hooks push and pop them): their
# parameters and buffers are the model's state, which a rule never turns into an activation's shard.
ACTIVE_MODELS: list = []


def rule(*funcs: Callable, any_operand: bool = False) -> Callable:
    """Register the decorated ``fn(op)`` as the rule for each of ``funcs`` (torch functions/methods).

    A rule sees a sharded tensor only as its first argument (the activation) unless it declares
    ``any_operand`` (broadcasting ops, joins, contractions, which check their operands themselves):
    the dispatcher refuses a sharded weight, statistic or index on every rank before the rule runs.
    A rule whose result depends on where a rank's positions lie reads them from the shard (``sizes``,
    ``starts``, ``start``), never from the rank order alone: a folded dim (``spec.Strided``) is then
    regrouped into contiguous pieces before the rule runs again."""

    def register(fn):
        for func in funcs:
            RULES[func] = RULES[_WRAPPED.get(func, func)] = fn
            if any_operand:
                ANY_OPERAND.update((func, _WRAPPED.get(func, func)))
        return fn

    return register


def user_frames(count: int = 1) -> list[str]:
    """``file:line (function): code`` of the ``count`` innermost callers outside torch, einops and this
    package, innermost first."""
    found, frame = [], sys._getframe(1)
    while frame is not None and len(found) < count:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_INTERNAL) and f"{os.sep}einops{os.sep}" not in path and "<frozen" not in path:
            code = linecache.getline(path, frame.f_lineno).strip()
            found.append(f"{path}:{frame.f_lineno} ({frame.f_code.co_name}): {code}")
        frame = frame.f_back
    return found


def user_frame() -> str:
    """``file:line (function): code`` of the innermost caller outside torch, einops and this package."""
    return (user_frames(1) or ["<unknown>"])[0]


def op_name(func: Callable) -> str:
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        return f"Tensor.{func.__self__.__name__}"
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__name__", repr(func))
    if module.startswith("torch.nn.functional") or module == "torch.nn.functional":
        return f"F.{name}"
    qual = getattr(func, "__qualname__", name)
    if qual.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qual.split(".", 1)[1]
    if module and not module.startswith("torch"):  # the user's own (a declared op, a custom Function)
        return qual
    return f"torch.{name}"


COMPILE_REFUSAL = (
    "torch.compile cannot trace ops on a ShardedTensor: they run through Python rules with collectives that "
    "dynamo does not capture. Run the parallelized model eagerly, or compile the submodules that see no sharded "
    "activation (e.g. the head after a global pooling)"
)


def compile_refusal() -> str:
    """The refusal for a ShardedTensor met while dynamo traces, naming the user's line (inside torch's
    flex attention, which compiles itself even in an eager model: ``flex_refusal``)."""
    return flex_refusal() or COMPILE_REFUSAL + f" at {user_frame()}"


def flex_refusal() -> str | None:
    """Inside torch's flex attention (any op of it, traced or not: torch 2.8 asks ``_is_view`` before
    it compiles), the refusal that names it, the user's line and another attention; else None."""
    frame = sys._getframe(1)
    while frame is not None and "flex_attention" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return None
    return (f"flex_attention cannot run on a ShardedTensor at {user_frame()}: this is torch's own function, bound "
            "to a name before nonlocal_dist was imported, and torch compiles it even in an eager model. Fix: "
            "import nonlocal_dist first or call torch.nn.attention.flex_attention.flex_attention (the runtime's "
            "wrapper runs it on sharded tokens: sharded.rules.flex), or run the model with a "
            "scaled_dot_product_attention backend (diffusers: set_attention_backend('native'))")


_UNBOUND = object()


class Op:
    """One intercepted call: the torch function, its arguments, and helpers for rules (a plain class
    with slots: one is made for every intercepted op)."""

    __slots__ = ("func", "args", "kwargs", "_found", "_named")

    def __init__(self, func: Callable, args: tuple, kwargs: dict) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self._found: list[Tensor] | None = None
        self._named = _UNBOUND

    def __repr__(self) -> str:
        return f"Op({self.name}, {len(self.args)} args, kwargs {sorted(self.kwargs)})"

    @property
    def name(self) -> str:
        return op_name(self.func)

    def refuse(self, why: str, dim: int | None = None, fix: str = "") -> ShardingRefusal:
        """The error to raise: op, dim, the user's line, why, and how to fix."""
        where = f" along sharded dim {dim}" if dim is not None else ""
        shapes = ", ".join(
            f"{tuple(t.spec.global_shape(t.shape))} sharded on dims {[d for d, _ in t.spec.dims]}"
            for t in self.sharded()
        )
        # The innermost user line, and the two lines that called it: a library's shared helper (diffusers'
        # attention dispatch, a rotary function) is named with the model's line that reached it.
        frames = user_frames(3) or ["<unknown>"]
        callers = "".join(f" [called from {f}]" for f in frames[1:])
        text = f"{self.name}{where} cannot run on a sharded activation ({shapes}) at {frames[0]}{callers}: {why}"
        return ShardingRefusal(flex_refusal() or text + (f". Fix: {fix}" if fix else ""))

    def _tensors(self) -> list[Tensor]:
        if self._found is None:
            self._found = []
            _collect_tensors(self.args, self._found)
            if self.kwargs:
                _collect_tensors(self.kwargs.values(), self._found)
        return self._found

    def tensors(self) -> list[Tensor]:
        return list(self._tensors())

    @property
    def named(self) -> dict | None:
        """The arguments by name of torch's overload for them (``arguments.bind``), or None."""
        if self._named is _UNBOUND:
            self._named = bind(self.func, self.args, self.kwargs)
        return self._named

    def sharded(self) -> list[ShardedTensor]:
        return [a for a in self._tensors() if isinstance(a, ShardedTensor)]

    def run(self, *args, **kwargs):
        """The torch function on local tensors (the shard's own storage, autograd as usual)."""
        return self.func(*args, **kwargs)


def _collect_tensors(values, found: list[Tensor]) -> None:
    """The tensors among ``values``, in order, through nested lists, tuples and dicts (as ``tree_flatten``
    would give them, without its per-leaf cost: this runs for every intercepted op)."""
    for value in values:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if type(item) is not int:  # a stride, a padding, a shape: no tensor inside
                    _collect_tensors(value, found)
                    break
        elif isinstance(value, dict):
            _collect_tensors(value.values(), found)


# Facts about the local tensor that the global shape does not change, read with no rule (a network
# asks for them at every layer: BatchNorm's input check, the device of a new buffer).
_LOCAL_FACTS = frozenset([Tensor.dim, Tensor.ndimension, *(getattr(Tensor, name).__get__ for name in (
    "dtype", "device", "layout", "requires_grad", "is_cuda", "is_leaf", "grad_fn", "is_sparse", "is_quantized",
    "is_meta"))])


class ShardedTensor(Tensor):
    """This rank's shard of a global activation, with its ``ShardSpec`` (see the module docstring)."""

    spec: ShardSpec

    @staticmethod
    def wrap(local: Tensor, spec: ShardSpec) -> ShardedTensor:
        """``local`` as a sharded tensor with ``spec`` (no copy, autograd history kept).

        Raises ``ShardingRefusal`` (on every rank: the spec is the same everywhere) for a spec that
        shards two dims over one process group, or over a mesh's span and one of its dims' groups:
        each rank would hold only its diagonal block."""
        if torch.compiler.is_compiling():  # dynamo traced the sharding itself (parallelize's hook, torch 2.8)
            raise RuntimeError(compile_refusal())
        groups = [covered(shard.group) for _, shard in spec.dims] if len(spec.dims) > 1 else ()
        if groups and sum(map(len, groups)) > len(frozenset().union(*groups)):
            dims = [d for d, _ in spec.dims]
            raise ShardingRefusal(
                f"a result sharded on dims {dims} with two of them over the same process group at {user_frame()}: "
                "each rank would hold only the block where its pieces of both dims meet, not its share of the "
                "tensor. Fix: shard the second dim over another mesh dim, or gather one operand first (full_tensor)"
            )
        if isinstance(local, ShardedTensor) or type(local) is not Tensor:
            local = local.as_subclass(Tensor)
        local.__class__ = ShardedTensor
        local.spec = spec
        return local

    def to_local(self) -> Tensor:
        """This rank's shard as a plain tensor (a view: gradients flow back to this tensor)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor)

    def __repr__(self, *, tensor_contents=None) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            shape = tuple(self.spec.global_shape(self.shape))
            return f"ShardedTensor(global shape {shape}, {self.spec}, local=\n{self.as_subclass(Tensor)!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _LOCAL_FACTS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args)
        if torch.compiler.is_compiling():
            raise RuntimeError(compile_refusal())
        if _functorch_level() is not None:  # a sharded value captured by a vmapped or grad-transformed function
            raise ShardingRefusal(
                f"{getattr(func, '__name__', func)} on a sharded activation inside a torch.func transform (vmap, "
                f"grad, ...) at {user_frame()}: the transform unwraps what it returns into plain tensors, so the "
                "result would be one rank's piece. Fix: gather it whole first (nonlocal_dist.sharded.full_tensor), "
                "or apply the transform outside the sharded model")
        args, kwargs = normalize(func, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            handler = RULES.get(func)
            op = Op(func, args, kwargs)
            try:
                if handler is None:
                    handler = _fallback(func)
                elif func not in ANY_OPERAND:
                    handler = _first_operand(op) or handler
                if REGROUPED:
                    _refuse_writes_into_copies(op)
                return handler(op)
            except ShardingRefusal:
                raise
            except PositionsNeeded:  # a rule asked where a folded dim's rows are: they are made contiguous
                return REGROUP[0](op, handler)
            except Exception as exc:
                failure.post(exc, f"{op.name} at {user_frame()}")
                raise


def run_rule(op: Op, handler: Callable[[Op], object]):
    """``handler(op)``, the folded operands regrouped where it asks where their rows are (for rules run
    outside the dispatcher: ``local_map``, a declared ``autograd.Function``)."""
    try:
        return handler(op)
    except PositionsNeeded:
        return REGROUP[0](op, handler)


def _first_operand(op: Op) -> Callable[[Op], object] | None:
    """For a rule that takes its activation first: None when it may run; ``replicated_or_refuse`` when
    every sharded argument is replicated but the first is plain; a refusal for any other sharded one."""
    first = op.args[0] if op.args else None
    for t in op._tensors():  # a loop, not any(): this runs for nearly every op
        if t is not first and isinstance(t, ShardedTensor) and t.spec.dims:
            break
    else:
        return None if isinstance(first, ShardedTensor) else replicated_or_refuse
    raise op.refuse("a sharded tensor in an argument other than its input (a weight, a statistic, an index, a "
                    "target shape)", fix="keep that argument plain (replicated), or gather it with full_tensor")


def replicated_spec(spec: ShardSpec, ndim: int) -> ShardSpec:
    return ShardSpec(ndim, (), spec.groups, spec.strategy)


# Property getters whose value depends on the global shape.
_SHAPE_PROPERTIES = {"shape", "ndim", "T", "mT", "H", "mH"}


def _fallback(func: Callable) -> Callable[[Op], object]:
    """Rule for a function with no registered rule: property getters; replicated-only ops run as they
    are; anything else touching a sharded activation is refused."""
    if getattr(func, "__name__", "") == "__set__" and hasattr(func, "__self__"):  # requires_grad, grad, data
        return lambda op: op.run(*op.args, **op.kwargs)
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        prop = func.__self__.__name__
        if prop in _SHAPE_PROPERTIES:
            return RULES.get(("property", prop), _refuse_unknown)
        return _property
    for family in FAMILIES:
        found = family(func)
        if found is not None:
            rule(func, any_operand=True)(found)
            return found
    return replicated_or_refuse


def _property(op: Op):
    """dtype, device, requires_grad, grad_fn, grad, data, ...: the local tensor's; a tensor of the
    shard's shape (``data``, ``grad``) keeps the spec."""
    (self,) = op.args
    value = op.run(self)
    if isinstance(value, Tensor) and value is not self and value.shape == self.shape:
        return ShardedTensor.wrap(value, self.spec)
    return value


_RANDOM = {"rand_like", "randn_like", "randint_like", "bernoulli", "bernoulli_", "normal_", "uniform_",
           "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "multinomial", "poisson"}


def replicated_or_refuse(op: Op):
    """Ops with only replicated activations: the same values on every rank give the same result."""
    sharded = op.sharded()
    if any(not t.spec.replicated for t in sharded):
        return _refuse_unknown(op)
    if getattr(op.func, "__name__", "") in _RANDOM:
        check_agreed(op, sharded[0].device)
    spec = sharded[0].spec
    plain = [t for t in op.tensors() if not isinstance(t, ShardedTensor)]

    def one(t):
        if not isinstance(t, Tensor) or isinstance(t, ShardedTensor) or any(t is a for a in plain):
            return t
        return ShardedTensor.wrap(t, replicated_spec(spec, t.dim()))

    return map_leaves(one, op.run(*op.args, **op.kwargs))


def _refuse_unknown(op: Op):
    dims = sorted({d for t in op.sharded() for d, _ in t.spec.dims})
    raise op.refuse(
        "no sharding rule for this op, so it cannot be shown to be exact",
        dims[0] if len(dims) == 1 else None,
        "apply it where the activation is whole (after a global pooling), declare it position-wise "
        "(nonlocal_dist.sharded.positionwise(op)) if each output position depends on the same input position only, "
        "or give it a rule (nonlocal_dist.sharded.register_rule(op, rule))",
    )


_plain_backward = torch.autograd.backward


def inplace_target(op: Op):
    """The tensor an in-place op writes to (``add_``, ``x[i] = v``, ``F.relu(x, inplace=True)``), or None."""
    kind = _inplace_kind(op.func)
    if kind is True or op.kwargs.get("inplace") or (kind is not None and len(op.args) > kind and bool(op.args[kind])):
        return op.args[0] if op.args else None
    return None


_FLAGGED = ("relu", "dropout", "threshold", "hardtanh", "elu", "leaky_relu", "relu6", "selu", "celu", "rrelu",
            "hardswish", "silu", "mish")


@functools.cache
def _inplace_kind(func) -> bool | int | None:
    """True for an op that always writes in place (``add_``, ``__iadd__``, ``__setitem__``); the position
    of its ``inplace`` flag for a functional that has one (``F.relu(x, True)``); else None. Read once
    per function (names and signatures are slow to read at every call)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__":
        return True
    if name not in _FLAGGED:
        return None
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


# ``run_regrouped(op, handler)`` of ``sharded.strided`` (it registers itself: the dispatcher does not
# import the rules' helpers it uses).
REGROUP: list[Callable[[Op, Callable], object]] = []
# The storages of operands regrouped from a folded dim (``sharded.strided``) and of views that resharded
# (``rules.shape``): a view of one (a slice of the folded frames, a split off the shard boundaries) is a
# view of a copy, so a write into it would not reach the tensor it was taken from.
REGROUPED: weakref.WeakSet = weakref.WeakSet()
# The storage of a folded or viewed tensor (and so of every alias of it) -> the copies that views
# returned to the user were taken of (a slice of the folded frames, a resharded split): while one
# lives, a write into the tensor would not reach it.
SLICED_AS_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def written(op: Op):
    """The tensor an op writes into: its in-place target (``inplace_target``), else its ``out=``, else None."""
    target = inplace_target(op)
    return op.kwargs.get("out") if target is None else target


def _refuse_writes_into_copies(op: Op) -> None:
    target = written(op)
    if not isinstance(target, Tensor):
        return
    storage = target.untyped_storage()
    if storage in REGROUPED:
        raise op.refuse(
            "it writes in place into a view that is a copy on the shards: a slice of frames folded by a view, taken "
            "along the folded dim (a view of the regrouped copy: each rank's whole samples), or a view that split a "
            "sharded dim off the shard boundaries (a view of the copy resharded onto its grid); the write would not "
            "reach the tensor it was taken from", fix="write into that tensor itself (x.view(b * t, ...)[i] = v is "
            "refused too: index the unfolded (b, t, ...) tensor), clone the view first to write into a copy, or "
            "shard so that the view's inner factors divide every rank's length")
    if SLICED_AS_COPIES.get(storage):
        raise op.refuse(
            "it writes in place into a tensor after a view of it was taken that is a copy on the shards (a slice of "
            "frames folded by a view, or a view that split a sharded dim off the shard boundaries and was "
            "resharded), so that view would not see the write",
            fix="take the view after the write, clone it, or slice the unfolded (b, t, ...) tensor")


_LEAVES = (Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def map_leaves(fn, tree):
    """``tree_map(fn, tree)``, with a shortcut for a tensor and for a flat tuple or dict of leaves (an
    op's usual arguments, a forward's usual arguments and outputs: pytree's walk costs tens of
    microseconds per call, as much as a small op)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if type(tree) is tuple and all(isinstance(v, _LEAVES) for v in tree):
        return tuple(fn(v) for v in tree)
    if type(tree) is dict and all(isinstance(v, _LEAVES) for v in tree.values()):
        return {k: fn(v) for k, v in tree.items()}
    return tree_map(fn, tree)  # any container pytree knows (a registered dataclass, a model output)


def holds_sharded(values) -> bool:
    """Whether a ``ShardedTensor`` is among ``values`` (any pytree: the arguments of a call that torch
    takes apart in C++ or compiles, where no ``__torch_function__`` would see it). A flat tuple of
    leaves (flex_attention's q, k and v, at every call of a model) skips pytree's walk."""
    if type(values) is tuple and all(isinstance(v, _LEAVES) for v in values):
        return any(isinstance(v, ShardedTensor) for v in values)
    return any(isinstance(t, ShardedTensor) for t in tree_flatten(values)[0])


def as_local(t):
    """A sharded tensor's local shard (``to_local``); anything else as it is (for ``tree_map``)."""
    return t.to_local() if isinstance(t, ShardedTensor) else t


@functools.wraps(_plain_backward)
def _backward(tensors, grad_tensors=None, *args, **kwargs):
    """``torch.autograd.backward`` that tells the other ranks when this rank's backward fails (a
    custom ``autograd.Function`` or a hook raising on one rank: the others, waiting in a collective
    of the backward, raise ``PeerFailure`` instead of hanging). Sharded outputs (DeepSpeed's and
    torch's reentrant checkpointing call it on the recomputed outputs with the local gradients) go
    in as their local tensors, attached to the graph, with torch functions left on: a checkpoint
    recomputed inside this backward still runs under the rules (torch 2.8 would compare the
    global shape with the gradient's; newer torch would run the rule with them off)."""
    try:
        with torch.enable_grad():  # inside a backward grad mode is off: the aliases must stay in the graph
            tensors, grad_tensors = tree_map(as_local, (tensors, grad_tensors))
        return _plain_backward(tensors, grad_tensors, *args, **kwargs)
    except Exception as exc:
        failure.post(exc, "in backward")
        raise


torch.autograd.backward = _backward
_WRAPPED[_backward] = _plain_backward

