"""Sweep cases: which OpInfo sample, which tensor arguments sharded along which dims, how split.

A sample's tensor arguments are its *leaves*: the tensors of ``(input, args, kwargs)`` in pytree
order. A ``Placement`` shards leaf ``leaf`` along ``dim`` over mesh dim ``mesh_dim`` with the
given piece lengths. Kinds of case (world size in ``KIND_WORLD``):

- ``uneven``: one dim of one leaf over 2 ranks, pieces of different lengths;
- ``empty``: the same over 3 ranks with an empty middle piece;
- ``pair``: two leaves each sharded along one dim by the same group (aligned when their
  right-aligned dims and lengths match, so a broadcasting op can run them together);
- ``two-dims``: two dims of one leaf over the same group (a spec a rule must refuse or handle);
- ``mesh``: two dims of one leaf over the two groups of a 2x2 mesh (4 ranks);
- ``held``: a length-1 dim of one leaf held by the last of 2 ranks (the first holds none of it: a
  first frame sliced off, frames folded into a batch of one), alone and paired with another leaf
  sharded along a longer dim by the same group;
- ``folded``: a dim of one leaf of length ``fold * n`` folded by a view from ``fold`` blocks whose
  n positions are split unevenly over 2 ranks (frames folded into the batch: ``spec.Strided``).

Samples are regenerated on every rank from the same seed (a digest of the op's name), so only the
case travels; ``Case.digest`` checks that the rank's sample is the parent's.
"""
from __future__ import annotations

import functools
import itertools
import random
import zlib
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

KINDS = ("uneven", "empty", "pair", "two-dims", "mesh", "held", "folded")
KIND_WORLD = {"uneven": 2, "empty": 3, "pair": 2, "two-dims": 2, "mesh": 4, "held": 2, "folded": 2}


@dataclass(frozen=True)
class Placement:
    """Leaf ``leaf`` split along ``dim`` over mesh dim ``mesh_dim`` into pieces of ``sizes``; with
    ``fold`` > 1, the dim is ``fold`` blocks each split into pieces of ``sizes`` (a folded dim)."""

    leaf: int
    dim: int
    mesh_dim: int
    sizes: tuple[int, ...]
    fold: int = 1

    def __str__(self) -> str:
        folded = f"{self.fold}x" if self.fold > 1 else ""
        return f"leaf{self.leaf}.dim{self.dim}{'@m1' if self.mesh_dim else ''}{folded}{list(self.sizes)}"


@dataclass(frozen=True)
class Case:
    """One OpInfo sample (``op``: full name, ``sample``: its index) with ``placements`` applied."""

    op: str
    sample: int
    kind: str
    placements: tuple[Placement, ...]
    digest: int = 0  # of the sample's leaves (shapes, dtypes, values), checked on every rank
    summary: str = ""  # the sample's shapes and arguments, for the report

    @property
    def world(self) -> int:
        return KIND_WORLD[self.kind]

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.op} {self.sample} {self.kind} {self.placements}".encode())

    def __str__(self) -> str:
        return f"{self.op}[{self.sample}] {self.kind} {' '.join(map(str, self.placements))}"


@functools.cache
def op_infos() -> dict:
    """Full name (``name.variant``) -> OpInfo, for the ops with float64 on CPU (torch's internal test
    package, imported on first use: it needs ``expecttest``)."""
    from torch.testing._internal.common_methods_invocations import op_db

    return {full_name(op): op for op in op_db if torch.float64 in op.supported_dtypes("cpu")}


def full_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def family(op) -> str:
    """The op's family for the report: its namespace, else the kind of OpInfo."""
    for prefix in ("nn.functional", "linalg", "fft", "special", "masked", "sparse", "signal", "nn"):
        if op.name.startswith(prefix + "."):
            return prefix
    kind = type(op).__name__
    return {"UnaryUfuncInfo": "unary", "BinaryUfuncInfo": "binary", "ReductionOpInfo": "reduction",
            "ShapeFuncInfo": "shape", "SpectralFuncInfo": "fft"}.get(kind, "other")


def samples(op, limit: int | None) -> list:
    """The op's first ``limit`` float64 samples, generated from a seed fixed by its name (the same
    values on every rank)."""
    seed = zlib.crc32(full_name(op).encode())
    torch.manual_seed(seed)
    random.seed(seed)
    made = op.sample_inputs("cpu", torch.float64, requires_grad=op.supports_autograd)
    return list(itertools.islice(made, limit))


def leaves(sample) -> list[torch.Tensor]:
    """The sample's tensors, in pytree order of (input, args, kwargs)."""
    flat = tree_flatten((sample.input, sample.args, sample.kwargs))[0]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def digest(sample) -> int:
    text = ";".join(f"{tuple(t.shape)}{t.dtype}{t.detach().double().sum().item() if t.numel() and t.layout == torch.strided else 0:.12g}"
                    for t in leaves(sample))
    return zlib.crc32(text.encode())


def summary(sample) -> str:
    """A short text of the sample: shapes of the tensors, other arguments as they are."""
    def show(a):
        if isinstance(a, torch.Tensor):
            return f"T{tuple(a.shape)}" + ("" if a.dtype == torch.float64 else str(a.dtype).replace("torch.", ":"))
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(show(x) for x in a) + "]"
        return repr(a)

    parts = [show(sample.input), *map(show, sample.args), *(f"{k}={show(v)}" for k, v in sample.kwargs.items())]
    text = ", ".join(parts)
    return text if len(text) <= 120 else text[:117] + "..."


def uneven(n: int) -> tuple[int, int]:
    """Two unequal pieces of ``n`` >= 3 (two of 1 for n = 2)."""
    return (n - n // 3, n // 3) if n >= 3 else (1, 1)


def with_empty(n: int) -> tuple[int, int, int]:
    """Three pieces of ``n`` >= 2, the middle one empty."""
    return (n - n // 2, 0, n // 2)


def _slots(shapes: list[tuple[int, ...] | None]) -> list[tuple[int, int, int]]:
    """(leaf, dim, length) of every dim long enough to split (``None``: a leaf that is not a strided
    dense tensor, never split)."""
    return [(i, d, n) for i, shape in enumerate(shapes) if shape is not None for d, n in enumerate(shape) if n >= 2]


def _ones(shapes: list[tuple[int, ...] | None]) -> list[tuple[int, int, int]]:
    """(leaf, dim, 1) of every length-1 dim."""
    return [(i, d, 1) for i, shape in enumerate(shapes) if shape is not None for d, n in enumerate(shape) if n == 1]


def shapes(sample) -> list[tuple[int, ...] | None]:
    return [tuple(t.shape) if t.layout == torch.strided else None for t in leaves(sample)]


def _pairs(dims, slots) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Two leaves sharded together: the first aligned pair (same right-aligned dim and length) and
    the first misaligned one."""
    aligned = misaligned = None
    for a, b in itertools.combinations(slots, 2):
        if a[0] == b[0]:
            continue
        same = len(dims[a[0]]) - a[1] == len(dims[b[0]]) - b[1] and a[2] == b[2]
        if same and aligned is None:
            aligned = (a, b)
        elif not same and misaligned is None:
            misaligned = (a, b)
    return [p for p in (aligned, misaligned) if p is not None]


def _two_dims(slots) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    for a, b in itertools.combinations(slots, 2):
        if a[0] == b[0]:
            return a, b
    return None


def sample_cases(name: str, index: int, sample, kinds) -> list[Case]:
    """Every case of ``kinds`` for one sample."""
    dims = shapes(sample)
    slots = _slots(dims)
    meta = {"digest": digest(sample), "summary": summary(sample)}
    out = []

    def case(kind, *placements):
        out.append(Case(name, index, kind, tuple(placements), **meta))

    for leaf, dim, n in slots:
        if "uneven" in kinds:
            case("uneven", Placement(leaf, dim, 0, uneven(n)))
        if "empty" in kinds:
            case("empty", Placement(leaf, dim, 0, with_empty(n)))
    if "pair" in kinds:
        for a, b in _pairs(dims, slots):
            case("pair", Placement(a[0], a[1], 0, uneven(a[2])), Placement(b[0], b[1], 0, uneven(b[2])))
    if "held" in kinds:
        for leaf, dim, _ in _ones(dims):
            case("held", Placement(leaf, dim, 0, (0, 1)))
        other = next(((a, b) for a in _ones(dims) for b in slots if a[0] != b[0]), None)
        if other is not None:
            a, b = other
            case("held", Placement(a[0], a[1], 0, (0, 1)), Placement(b[0], b[1], 0, uneven(b[2])))
    if "folded" in kinds:
        for leaf, dim, n in slots:
            fold = next((f for f in range(2, n) if n % f == 0 and n // f >= 2), None)
            if fold is not None:
                case("folded", Placement(leaf, dim, 0, uneven(n // fold), fold))
    two = _two_dims(slots)
    if two is not None:
        a, b = two
        if "two-dims" in kinds:
            case("two-dims", Placement(a[0], a[1], 0, uneven(a[2])), Placement(b[0], b[1], 0, uneven(b[2])))
        if "mesh" in kinds:
            case("mesh", Placement(a[0], a[1], 0, uneven(a[2])), Placement(b[0], b[1], 1, uneven(b[2])))
    return out


def _spread(indices: list[int], limit: int | None) -> list[int]:
    """``limit`` of ``indices`` evenly spaced (all of them when ``limit`` is None or larger)."""
    if limit is None or len(indices) <= limit:
        return indices
    return sorted({indices[k * len(indices) // limit] for k in range(limit)})


def enumerate_cases(ops: list[str] | None = None, kinds=KINDS, samples_per_op: int | None = 4,
                    every: int = 1) -> list[Case]:
    """The cases of ``ops`` (full names; all float64 ops when None): ``samples_per_op`` samples of each
    with a dim to split, spread over its sample list; then every ``every``-th case (a deterministic
    thinning for quick runs)."""
    infos = op_infos()
    names = sorted(infos) if ops is None else list(ops)
    missing = [n for n in names if n not in infos]
    if missing:
        raise ValueError(f"ops {missing} are not float64 OpInfo entries; names look like 'sum' or 'nn.functional.pad.reflect'")
    out = []
    for name in names:
        try:
            made = samples(infos[name], None)
        except Exception:  # a sample generator that fails on this build: no cases from it
            continue
        splittable = [i for i, s in enumerate(made) if _slots(shapes(s)) or ("held" in kinds and _ones(shapes(s)))]
        for index in _spread(splittable, samples_per_op):
            out.extend(sample_cases(name, index, made[index], kinds))
    return out[::every]
