"""One sweep case on one rank: the op on sharded arguments, gathered, against the one-process result.

Reference: the op on the whole float64 sample, and the input gradients of ``sum(out * g)`` for a
fixed random ``g`` per differentiable output (the same on every rank). Sharded: the sharded leaves
are ``distribute``d from the same whole tensors (differentiable), the rest stay plain; every output
is gathered whole (``full_tensor``) and compared; the loss is divided by the world size and each
input gradient summed over the ranks (the runtime's convention: a rank's gradient is its part).

Returns an ``Outcome``: ``ok`` (equal), ``refused`` (``ShardingRefusal`` in the forward),
``mismatch`` (a wrong value, shape, dtype, type or autograd flag), ``error`` (any other exception,
with the phase it came in) or ``skip`` (the reference itself fails, or the sample differs from the
parent's). ``random``: the reference differs between two seeds (a random or uninitialised output),
so only the structure is compared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from nonlocal_dist.sharded.distribute import distribute, full_tensor
from nonlocal_dist.sharded.sweep.cases import Case, digest, leaves
from nonlocal_dist.sharded.tensor import ShardedTensor, ShardingRefusal

RTOL = ATOL = 1e-8  # float64: equal up to the rounding of a reordered sum


@dataclass
class Outcome:
    status: str  # ok | refused | mismatch | error | skip
    detail: str = ""
    random: bool = False


class Mismatch(AssertionError):
    pass


def _fresh(ts: list[Tensor]) -> list[Tensor]:
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def call(op, sample, new_leaves: list) -> object:
    """``op`` on ``sample`` with its tensors replaced by ``new_leaves`` (pytree order)."""
    flat, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    it = iter(new_leaves)
    inp, args, kwargs = tree_unflatten([next(it) if isinstance(a, Tensor) else a for a in flat], spec)
    return op.op(inp, *args, **kwargs)


def _differentiable(outputs: list) -> list[int]:
    return [i for i, o in enumerate(outputs) if isinstance(o, Tensor) and o.requires_grad
            and (o.is_floating_point() or o.is_complex())]


def _output_grads(outputs: list, which: list[int], seed: int) -> dict[int, Tensor]:
    return {i: torch.randn(outputs[i].shape, dtype=outputs[i].dtype,
                           generator=torch.Generator().manual_seed(seed + i)) for i in which}


def _input_grads(outputs: list, grads: dict[int, Tensor], inputs: list[Tensor], scale: float) -> list:
    wanted = [t for t in inputs if t.requires_grad]
    if not grads or not wanted:
        return []
    loss = sum((outputs[i] * g).sum() for i, g in grads.items()) / scale
    got = torch.autograd.grad(loss, wanted, allow_unused=True)
    # autograd.grad may hand back a view (cat's backward slices the output's gradient): contiguous
    # for the in-place all_reduce that sums the ranks' parts (gloo does not write back into a view).
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(wanted, got)]


def seeds_itself(op) -> bool:
    """A random op that OpInfo wraps to seed the generator itself (``wrapper_set_seed``): its output does
    not change with the caller's seed, but it is random all the same."""
    code = getattr(op.op, "__code__", None)
    return code is not None and "wrapper_set_seed" in code.co_names


def _reference(op, sample, seed: int):
    torch.manual_seed(seed)
    inputs = _fresh(leaves(sample))
    out = call(op, sample, inputs)
    flat, spec = tree_flatten(out)
    return inputs, flat, spec


def _tolerance(dtypes) -> dict:
    """Float64 everywhere: RTOL/ATOL. A gradient through a lower-precision output (a cast) is summed
    over the ranks in that precision: torch's default tolerance for it."""
    low = [d for d in dtypes if d.is_floating_point and d != torch.float64]
    if not low:
        return {"rtol": RTOL, "atol": ATOL}
    eps = max(torch.finfo(d).eps for d in low)
    return {"rtol": 4 * eps, "atol": 4 * eps}


def _compare_leaf(where: str, got, want, random: bool, tolerance: dict | None = None) -> None:
    if isinstance(want, Tensor) != isinstance(got, Tensor):
        raise Mismatch(f"{where}: {type(got).__name__} where one process gives {type(want).__name__}")
    if not isinstance(want, Tensor):
        if not random and got != want:
            raise Mismatch(f"{where}: {got!r} != {want!r}")
        return
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise Mismatch(f"{where}: {tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}")
    if random:
        return
    try:
        torch.testing.assert_close(got.detach(), want.detach(), equal_nan=True,
                                   **(tolerance or {"rtol": RTOL, "atol": ATOL}))
    except AssertionError as exc:
        first = [line for line in str(exc).splitlines() if "Greatest" in line or "Mismatched" in line]
        raise Mismatch(f"{where}: values differ ({'; '.join(first)[:160]})") from None


def _shard(leaf: Tensor, case: Case, index: int, groups: tuple) -> Tensor:
    mine = [p for p in case.placements if p.leaf == index]
    if not mine:
        return leaf
    if len(mine) == 1 and mine[0].fold > 1:  # the blocks apart, their dim sharded, then folded by a view
        p, shape = mine[0], list(leaf.shape)
        blocks = leaf.view(shape[:p.dim] + [p.fold, shape[p.dim] // p.fold] + shape[p.dim + 1:])
        layout = " ".join(f"a{d}" for d in range(blocks.dim()))
        return distribute(blocks, groups[p.mesh_dim], layout, f"a{p.dim + 1}", sizes=[list(p.sizes)]).view(shape)
    layout = " ".join(f"a{d}" for d in range(leaf.dim()))
    mesh = tuple(groups[p.mesh_dim] for p in mine)
    return distribute(leaf, mesh, layout, [f"a{p.dim}" for p in mine], sizes=[list(p.sizes) for p in mine])


def agree(ok: bool) -> bool:
    """Whether every rank is ok (one all-reduce): every rank then takes the same next collective."""
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _forward(op, sample, case: Case, groups: tuple, ref: tuple):
    """(outcome or None, gathered outputs, sharded-side leaves)."""
    ref_inputs, ref_flat, ref_spec, which, random = ref
    torch.manual_seed(case.seed)
    inputs = _fresh(leaves(sample))
    phase = "forward"
    try:
        try:  # the layout itself may be refused (two dims over one group)
            sharded = [_shard(t, case, i, groups) for i, t in enumerate(inputs)]
            out = call(op, sample, sharded)
        except ShardingRefusal as exc:
            return Outcome("refused", str(exc).split(" at ")[0][:200], random), None, inputs
        phase = "gather"
        flat = tree_flatten(out)[0]
        whole = [full_tensor(o) if isinstance(o, ShardedTensor) else o for o in flat]
        ref_out = tree_unflatten(ref_flat, ref_spec)
        same_type = isinstance(out, Tensor) if isinstance(ref_out, Tensor) else type(out) is type(ref_out)
        if len(flat) != len(ref_flat) or not same_type:
            raise Mismatch(f"output {type(out).__name__} of {len(flat)} values where one process gives "
                           f"{type(ref_out).__name__} of {len(ref_flat)}")
        for i, (got, want) in enumerate(zip(whole, ref_flat)):
            _compare_leaf(f"output {i}", got, want, random)
            if i in which and not got.requires_grad:
                raise Mismatch(f"output {i} does not require grad (one process's does)")
        sharded_leaves = {p.leaf for p in case.placements}
        for i, (got, want) in enumerate(zip(inputs, ref_inputs)):  # arguments the op updates (running stats)
            if i not in sharded_leaves and not want.requires_grad and not random:
                _compare_leaf(f"argument {i} after the op", got, want, False)
    except Mismatch as exc:
        return Outcome("mismatch", str(exc)), None, inputs
    except Exception as exc:
        return _error(phase, exc), None, inputs
    return None, whole, inputs


def _error(phase: str, exc: Exception) -> Outcome:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return Outcome("error", f"{phase}: {type(exc).__name__}: {text}")


def run_case(op, sample, case: Case, groups: tuple) -> Outcome:
    """The case on this rank (every rank of the world calls it with the same case, and takes the same
    collectives of its own: ``agree`` after the forward and before summing the gradients)."""
    skip, random = None, False
    if digest(sample) != case.digest:
        skip = Outcome("skip", "the sample differs from the parent's on this rank")
    else:
        try:
            ref_inputs, ref_flat, ref_spec = _reference(op, sample, case.seed)
            again = _reference(op, sample, case.seed + 1)[1]
            random = seeds_itself(op) or any(isinstance(a, Tensor) and a.shape == b.shape and not torch.equal(
                a.detach(), b.detach()) for a, b in zip(ref_flat, again) if isinstance(b, Tensor))
            which = _differentiable(ref_flat)
            grads = _output_grads(ref_flat, which, case.seed)
            ref_grads = _input_grads(ref_flat, grads, ref_inputs, 1.0) if not random else []
        except Exception as exc:
            skip = Outcome("skip", f"the one-process op raises {type(exc).__name__}: {str(exc)[:100]}")
    if not agree(skip is None):  # a skip on one rank is a skip on every rank: no rank left in a collective
        return skip or Outcome("skip", "another rank skips this sample")
    # Random on one rank is random on every rank: an uninitialised output (``empty_like``) may happen to
    # repeat on one rank and not on another, and the ranks must take the same path below.
    random = not agree(not random)
    outcome, whole, inputs = _forward(op, sample, case, groups, (ref_inputs, ref_flat, ref_spec, which, random))
    if not agree(outcome is None) or outcome is not None:
        return outcome or Outcome("ok", "another rank failed the forward")
    if random:
        return Outcome("ok", "", True)
    try:
        got_grads = _input_grads(whole, grads, inputs, float(dist.get_world_size()))
    except Exception as exc:
        outcome = _error("backward", exc)
    if not agree(outcome is None):
        return outcome or Outcome("ok", "another rank failed the backward")
    for g in got_grads:
        dist.all_reduce(g)
    try:
        tolerance = _tolerance(ref_flat[i].dtype for i in which)
        for i, (got, want) in enumerate(zip(got_grads, ref_grads)):
            _compare_leaf(f"grad of input {i}", got, want, False, tolerance)
    except Mismatch as exc:
        return Outcome("mismatch", str(exc))
    return Outcome("ok")
