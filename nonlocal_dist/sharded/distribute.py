"""Entry points of the sharded-activation runtime: ``distribute`` a tensor, ``parallelize`` a model.

``distribute(x, mesh, layout, axes)`` cuts a whole tensor (the same on every rank) into this rank's
``ShardedTensor``; ``from_local`` wraps shards the ranks already hold (decoded per rank) after one
agreement on their lengths. ``parallelize(model, mesh, axes)`` registers two hooks and nothing
else: the forward pre-hook distributes the model's tensor inputs, the post-hook returns plain
tensors (replicated outputs as they are, sharded ones gathered, or kept with ``output="local"``).
The model is not changed: parameters, buffers, ``deepcopy``, ``torch.save``, EMA, ZeRO-3 and
FSDP see the plain model. Every op in its forward runs sharded or is refused (``sharded/tensor.py``).

Mesh: a process group (one mesh dim), a tuple of groups (one per mesh dim), or a
``torch.distributed.device_mesh.DeviceMesh``; ``axes[i]`` is sharded over mesh dim i (a
``DeviceMesh`` with named dims takes each axis over the dim of the same name, so a further
``"dp"`` dim stays data parallel).
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import nonlocal_dist.distributed.failure as failure
import nonlocal_dist.sharded.rng as rng
import nonlocal_dist.sharded.rules  # noqa: F401  (importing registers the rules)
import nonlocal_dist.sharded.strided  # noqa: F401  (importing registers the regroup of folded dims)
from nonlocal_dist.distributed.checks import agree_across_ranks, digest, exchange_device
from nonlocal_dist.distributed.collectives import gather_dim
from nonlocal_dist.distributed.comm import broadcast_
from nonlocal_dist.distributed.mesh import mesh_groups, span_group
from nonlocal_dist.distributed.shards import split_sizes
from nonlocal_dist.layout import axis_dims
from nonlocal_dist.sequence.allgather import RegatherAhead
from nonlocal_dist.sequence.strategies import STRATEGIES
from nonlocal_dist.sharded.spec import Shard, ShardSpec, Strided
from nonlocal_dist.sharded.tensor import ACTIVE_MODELS, ShardedTensor, map_leaves


def _axes(axes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def distribute(x: Tensor, mesh, layout: str, axes: str | Sequence[str], *, align: int | Sequence[int] = 1,
               sizes: Sequence[Sequence[int]] | None = None, strategy: str | None = None) -> ShardedTensor:
    """This rank's shard of the whole tensor ``x`` (the same on every rank), split along ``axes``.

    ``x`` (any shape named by ``layout``, e.g. ``"b c t h w"``); each axis in ``axes`` is cut into
    contiguous pieces over its mesh dim (``split_sizes``: even, every rank but the last a multiple
    of ``align``; empty pieces when N < P), or by the given ``sizes`` (one list per axis).
    ``strategy``: of attention over tokens computed from it (``parallelize``'s; None: each form's
    default). Differentiable: the gradient of the shard flows back to ``x``. The shard is contiguous
    (copied where the cut is not).
    """
    _check_strategy(strategy)
    axes = _axes(axes)
    groups = mesh_groups(mesh, axes)
    dims = axis_dims(layout, axes, x.dim())
    aligns = [align] * len(axes) if isinstance(align, int) else list(align)
    shards = {}
    local = x.as_subclass(Tensor) if isinstance(x, ShardedTensor) else x
    for i, (d, group) in enumerate(zip(dims, groups)):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        split = split_sizes(local.shape[d], world, aligns[i]) if sizes is None else tuple(sizes[i])
        if len(split) != world or sum(split) != local.shape[d] or min(split) < 0:
            raise ValueError(f"sizes {list(split)} for axis {axes[i]!r} must be {world} lengths >= 0 summing to "
                             f"its length {local.shape[d]}")
        shard = Shard(group, split, rank)
        local = local.narrow(d, shard.start, shard.local)
        shards[d] = shard
    # The shard with the strides of a whole tensor of its shape (a copy where the cut is not already
    # so, as DTensor's): a view the network takes of the global tensor is then a view of each local one.
    local = local.contiguous()
    return ShardedTensor.wrap(local, ShardSpec(x.dim(), tuple(sorted(shards.items())), groups, strategy))


def _check_strategy(strategy: str | None) -> None:
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)} or None, got {strategy!r}")


def from_local(x: Tensor, mesh, layout: str, axes: str | Sequence[str]) -> ShardedTensor:
    """Wrap the shard this rank holds already (e.g. decoded frames); one agreement on every rank's
    length along each axis, the other dims and the dtype (raises on every rank on a mismatch)."""
    axes = _axes(axes)
    groups = mesh_groups(mesh, axes)
    dims = axis_dims(layout, axes, x.dim())
    shards = {}
    for d, group in zip(dims, groups):
        def validate():
            others = tuple(-1 if k == d else n for k, n in enumerate(x.shape))
            return None, {"shape": others, "dtype": x.dtype, "length": int(x.shape[d])}

        _, values = agree_across_ranks(group, validate, ("shape", "dtype", "length"), what="from_local",
                                       free=("length",))
        shards[d] = Shard(group, tuple(values["length"]), dist.get_rank(group))
    return ShardedTensor.wrap(x, ShardSpec(x.dim(), tuple(sorted(shards.items())), groups))


def full_tensor(x: Tensor) -> Tensor:
    """The whole tensor on every rank (differentiable all-gather along each sharded dim)."""
    if not isinstance(x, ShardedTensor):
        return x
    local = x.as_subclass(Tensor)
    for d, shard in x.spec.dims:
        if isinstance(shard, Strided):  # a folded dim: each block gathered, the blocks in order
            local = gather_dim(shard.unfold(local, d), d + 1, list(shard.base.sizes), shard.group).flatten(d, d + 1)
        elif shard.world > 1:  # a group of one holds the whole dim already
            local = gather_dim(local, d, list(shard.sizes), shard.group)
    return local


def _describe_argument(value) -> object:
    """What must be equal on every rank about one forward argument: a whole tensor's shape and dtype,
    a Python value itself (an int, a flag, a name), anything else its type."""
    if isinstance(value, ShardedTensor):
        return "ShardedTensor"
    if isinstance(value, Tensor):
        return tuple(value.shape), str(value.dtype)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    return type(value).__name__


def _state_digests(model: nn.Module) -> dict[str, int]:
    """One digest per parameter and buffer (dtype, shape and exact bits)."""
    return {name: digest(t) for name, t in [*model.named_parameters(), *model.named_buffers()]}


# Bumped whenever any module anywhere registers a submodule (torch's global registration hook): a
# model's modules are walked again only then, not at every agreement (the walk took most of a small
# model's agreement: 0.2-0.4 ms of a 2-layer Wan forward). model -> (generation, its submodules with
# a flag for those that have settings); the root is not in the list, so the entry dies with the model.
_STRUCTURE = [0]
_SUBMODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure_changed(module, name, submodule) -> None:
    _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)


def _module_settings(model: nn.Module) -> tuple:
    """Each module's training flag and, where it has them, the settings its sharded computation relies
    on (a ``NonLocalBlock``'s mode, scale, backend and strategy: its ``agreed_settings()``). A module
    deleted from the model (no registration) is still read until a submodule is registered anywhere."""
    generation, modules = _SUBMODULES.get(model, (None, None))
    if generation != _STRUCTURE[0]:
        # The method looked up on the class: ``hasattr`` on a module goes through ``nn.Module.__getattr__``.
        modules = [(m, hasattr(type(m), "agreed_settings")) for m in model.modules()][1:]
        _SUBMODULES[model] = generation, modules = _STRUCTURE[0], modules
    return tuple((m.training, m.agreed_settings()) if settings else m.training
                 for m, settings in [(model, hasattr(type(model), "agreed_settings")), *modules])


def _raise_differing_state(span, mine: dict[str, int]) -> None:
    """Every rank is here (they all saw the differing digest): name the parameters that differ."""
    states: list = [None] * dist.get_world_size(span)
    dist.all_gather_object(states, mine, group=span)
    names = [n for n in mine if len({str(s.get(n)) for s in states}) > 1]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise failure.everywhere(ValueError(
        f"the parallelized model's parameters or buffers differ between ranks ({shown}): each rank would "
        "compute with its own weights. Build the model with the same torch.manual_seed on every rank, load the "
        "same checkpoint, or pass sync_module_states=True to parallelize (rank 0's are broadcast, as FSDP does)"))


class _Hooks:
    """parallelize's two hooks and its settings (picklable state; no process group kept on the model)."""

    def __init__(self, mesh, layout: str, axes: tuple[str, ...], output: str, align, sizes,
                 inputs: tuple[tuple[int | str, int], ...] | None = None, strategy: str | None = None) -> None:
        self.mesh, self.layout, self.axes, self.output = mesh, layout, axes, output
        self.align, self.sizes, self.inputs, self.strategy = align, sizes, inputs, strategy
        self.state_checked = False
        self.rng_states: list[tuple] = []  # the user's generator states, given back by the post-hook
        self.chains: list[RegatherAhead] = []  # the all-gather nodes of each call running (sequence.allgather)

    def __deepcopy__(self, memo) -> _Hooks:  # a copy of the model (EMA) runs on the same mesh
        return self

    def __getstate__(self) -> dict:  # torch.save(model): a mesh does not travel; a loaded model runs plain
        return {**self.__dict__, "mesh": None}

    def __setstate__(self, state: dict) -> None:  # a model saved before a field was added loads too
        self.__dict__.update({"rng_states": [], "chains": [], **state})

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.mesh is None:
            return None

        self.rng_states.append(None)  # the post-hook pops this call's entry, whatever happens below
        self.chains.append(RegatherAhead.open())
        ACTIVE_MODELS.append(module)
        seed = self._agree(module, (args, kwargs))
        device = next((t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), torch.device("cpu"))
        self.rng_states[-1] = rng.enter_agreed(seed, device)

        def one(t):
            if isinstance(t, ShardedTensor) or not isinstance(t, Tensor) or t.dim() != len(self.layout.split()):
                return t
            return distribute(t, self.mesh, self.layout, self.axes, align=self.align, sizes=self.sizes,
                              strategy=self.strategy)

        if self.inputs is None:
            return map_leaves(one, args), map_leaves(one, kwargs)
        return self._shard_chosen(module, args, kwargs)

    def _shard_chosen(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args``/``kwargs`` with the chosen inputs sharded, every other one as given."""
        args, kwargs = list(args), dict(kwargs)
        for key, position in self.inputs:  # positions resolved once, at parallelize
            if isinstance(key, str) and key in kwargs:
                where, at = kwargs, key
            else:
                where, at = (args, position) if position < len(args) else (None, None)
            value = where[at] if where is not None else None
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
                where[at] = type(value)(self._sharded(module, key, v) for v in value)  # one clip per item (Cosmos 3)
            elif where is None:
                raise ValueError(f"parallelize(inputs=...) shards {type(module).__name__}.forward's input {key!r}, "
                                 f"which is not given: expected a tensor in layout {self.layout!r}")
            else:
                where[at] = self._sharded(module, key, value)
        return tuple(args), kwargs

    def _sharded(self, module: nn.Module, key, value) -> ShardedTensor:
        """One chosen input sharded (a ``ShardedTensor`` as it is)."""
        if isinstance(value, ShardedTensor):
            return value
        if not isinstance(value, Tensor) or value.dim() != len(self.layout.split()):
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"parallelize(inputs=...) shards {type(module).__name__}.forward's input {key!r}, "
                             f"which is {got}: expected a tensor in layout {self.layout!r} (or a list of them)")
        return distribute(value, self.mesh, self.layout, self.axes, align=self.align, sizes=self.sizes,
                          strategy=self.strategy)

    @torch.compiler.disable  # collectives and digests on the host: never traced
    def _agree(self, module: nn.Module, inputs) -> int:
        """One small all-gather over the whole mesh: every rank's inputs have the same shapes and dtypes
        and its other arguments the same values (a rank fed another clip size, its own slice or its own
        flag raises on every rank instead of hanging), its modules the same training modes and block
        settings (so the blocks inside need no agreement of their own: their lengths come from the
        spec); at the first call also the same parameters and buffers (a model built with another seed
        on some rank raises instead of computing wrongly).
        Returns the first rank's random seed for this call (``sharded.rng``)."""
        span = span_group(mesh_groups(self.mesh, self.axes))
        if dist.get_world_size(span) == 1:  # nothing to agree on
            self.state_checked = True
            return rng.draw_seed()
        described = tuple(_describe_argument(t) for t in tree_flatten(inputs)[0])
        states = None if self.state_checked else _state_digests(module)
        fields = {"inputs": described, "parameters and buffers": tuple(sorted(states.items())) if states else None,
                  "training modes and block settings": _module_settings(module), "attention strategy": self.strategy,
                  "seed": rng.draw_seed()}
        try:
            _, values = agree_across_ranks(
                span, lambda: (None, fields), tuple(fields), free=("seed",),
                what="the parallelized model (whole inputs, the same clip and arguments on every rank)")
        except ValueError as exc:
            if states is not None and "parameters and buffers per rank" in str(exc):
                try:
                    _raise_differing_state(span, states)
                except ValueError as named:
                    raise named from None  # not chained to the digests' message
            raise
        self.state_checked = True
        return values["seed"][0]

    def post(self, module: nn.Module, args: tuple, output):
        if ACTIVE_MODELS and ACTIVE_MODELS[-1] is module:
            ACTIVE_MODELS.pop()
        saved = self.rng_states.pop() if self.rng_states else None
        if saved is not None:
            rng.leave_agreed(saved)
        if self.chains:
            self.chains.pop().close()
        if output is None:  # the forward raised: tell the other ranks (always_call hook)
            failure.post_current(f"in the forward of {type(module).__name__}")
            return None

        def one(t):
            if not isinstance(t, ShardedTensor):
                return t
            if t.spec.replicated or self.output == "local":
                return t.to_local()
            return full_tensor(t)

        return map_leaves(one, output)


def _check_inputs(model: nn.Module, inputs) -> tuple[tuple[int | str, int], ...] | None:
    """``inputs`` (positions or parameter names of ``model.forward``) as ``(key, position)`` pairs."""
    if inputs is None:
        return None
    chosen = (inputs,) if isinstance(inputs, (int, str)) else tuple(inputs)
    names = list(inspect.signature(model.forward).parameters)
    for key in chosen:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"inputs= takes positions (ints) or parameter names (strs), got {key!r}")
        if isinstance(key, str) and key not in names:
            raise ValueError(f"inputs= names {key!r}, which is not a parameter of {type(model).__name__}.forward "
                             f"{tuple(names)}; give one of those names, or a position")
    if not chosen:
        raise ValueError("inputs= is empty: name at least one input to shard (or leave it None)")
    return tuple((key, names.index(key) if isinstance(key, str) else key) for key in chosen)


def _broadcast_state(model: nn.Module, groups) -> None:
    """Every parameter and buffer of the mesh's first rank on every rank of the mesh, in place."""
    span = span_group(groups)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                buffer = t.detach().to(exchange_device(span))
                broadcast_(buffer, 0, span)
                t.copy_(buffer)


def parallelize(model: nn.Module, mesh, axis: str | Sequence[str] = "t", *, layout: str = "b c t h w",
                output: str = "full", align: int | Sequence[int] = 1, sizes: Sequence[Sequence[int]] | None = None,
                strategy: str | None = None, sync_module_states: bool = False,
                inputs: Sequence[int | str] | None = None) -> nn.Module:
    """Run ``model`` with its inputs sharded along ``axis`` (one axis name, or one per mesh dim) over ``mesh``;
    returns ``model`` (two hooks added).

    Inputs: whole tensors named by ``layout`` (the same clip on every rank of the mesh; other
    tensor arguments of another rank pass unchanged) or ``ShardedTensor``s (``from_local``).
    ``inputs``: which forward arguments to shard, by position or by parameter name (a diffusers
    transformer: ``inputs=("hidden_states",)``; a list of tensors: each of them, as Cosmos 3's clips);
    every other argument stays whole on every rank
    (text embeddings, a timestep, a mask). Default: every tensor argument with as many dims as the
    layout.
    Outputs: replicated ones (logits after a global pooling) as plain tensors; sharded ones
    gathered whole (``output="full"``) or this rank's shard (``output="local"``). Every op of the
    forward runs exact on the shards or raises on every rank naming the op and the source line.
    Loss convention: a loss computed on every rank from replicated outputs is divided by the group
    size (``integrations.deepspeed_sp.loss_scale``); each rank's parameter gradient is then its
    part, and their sum (DeepSpeed's reduction) is the single-device gradient. ``align``: shard
    lengths a multiple of it (``split_sizes``; the network's stride along the axis), or ``sizes``: the
    lengths, one list per axis. ``strategy``: the sequence-parallel strategy of attention over the
    sharded tokens (``F.scaled_dot_product_attention``: ``"ring"``, the zigzag ring where causal;
    ``"allgather"``; ``"ulysses"``, not causal; refused where a form cannot run the one named; carried
    by the activations of this model, in their spec, and so by their recomputation in backward, another
    model on the same groups keeping its own; None: each form's default) and of every
    ``NonLocalBlock`` (``nonlocal_op``'s). ``sync_module_states``: broadcast the first rank's
    parameters and buffers to every rank of the mesh now (as FSDP does); otherwise the first
    forward checks that they are equal on every rank (one digest in the pre-hook's agreement) and
    raises on every rank, naming them, where they are not. Random ops (``sharded.rng``): each
    forward runs on one seed agreed in that same agreement, so replicated values draw alike on
    every rank and each shard draws its own values. Only a call of ``model`` itself (its ``forward``)
    runs sharded: a method that calls its submodules directly (a VAE's ``encode``/``decode``) passes
    the hooks by, so a warning names them; parallelize the submodule such a method calls
    (``vae.decoder``).
    """
    axes = _axes(axis)
    bypass = [name for name in ("encode", "decode") if callable(getattr(type(model), name, None))]
    if bypass:
        warnings.warn(f"parallelize hooks {type(model).__name__}.forward only: calls of its {', '.join(bypass)} "
                      "method(s) run unsharded. Parallelize the submodule they call (e.g. model.decoder) to shard "
                      "those", stacklevel=2)
    if output not in ("full", "local"):
        raise ValueError(f"output must be 'full' or 'local', got {output!r}")
    chosen = _check_inputs(model, inputs)
    groups = mesh_groups(mesh, axes)
    axis_dims(layout, axes, len(layout.split()))
    _check_strategy(strategy)
    if strategy is not None:
        for block in model.modules():  # NonLocalBlocks (the block sits above this package: no import)
            if hasattr(block, "sp_strategy"):
                block.sp_strategy = strategy
    if sync_module_states:
        _broadcast_state(model, groups)
    hooks = _Hooks(mesh, layout, axes, output, align, sizes, chosen, strategy)
    model.register_forward_pre_hook(hooks.pre, with_kwargs=True)
    model.register_forward_hook(hooks.post, always_call=True, prepend=True)  # the last pre-hook's post runs first
    return model
