"""Layout strings: which named axes of a tensor are positions, channels, batch, and how to move them.

``layout`` names every axis of the input (``"b c t h w"``, ``"b n c"``); ``axes`` picks the position
axes whose positions interact; every other named axis folds into the batch. Parsed once and cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from einops import rearrange, reduce
from torch import Tensor

from nonlocal_dist.validate import positive_int


@dataclass(frozen=True)
class Layout:
    """A parsed layout: ``names`` in input order, the interacting ``axes`` and the ``folded`` rest."""

    names: tuple[str, ...]
    axes: tuple[str, ...]
    folded: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.names)

    @property
    def positions_pattern(self) -> str:
        return f"({' '.join(('b', *self.folded))}) {' '.join(self.axes)} c"

    def check(self, x: Tensor, channels: int) -> None:
        """Raise a ``ValueError`` naming layout, shape and the mismatch when ``x`` does not fit."""
        if x.dim() != len(self.names):
            raise ValueError(
                f"layout {self.text!r} names {len(self.names)} axes but the input has shape "
                f"{tuple(x.shape)} ({x.dim()} axes); pass a tensor of that rank or change layout="
            )
        got = x.shape[self.names.index("c")]
        if got != channels:
            raise ValueError(
                f"expected {channels} channels on axis 'c' of layout {self.text!r}, "
                f"got {got} (input shape {tuple(x.shape)})"
            )

    def sizes(self, x: Tensor) -> dict[str, int]:
        return dict(zip(self.names, x.shape))

    def to_positions(self, x: Tensor) -> Tensor:
        """(layout) -> (B', *axes sizes, C) with the folded axes inside B'."""
        return rearrange(x, f"{self.text} -> {self.positions_pattern}")

    def from_positions(self, z: Tensor, sizes: dict[str, int]) -> Tensor:
        """Inverse of ``to_positions``; ``sizes`` are those of the original input."""
        keep = {name: sizes[name] for name in ("b", *self.folded)}
        return rearrange(z, f"{self.positions_pattern} -> {self.text}", **keep)


def _tokens(text: str | Sequence[str], what: str) -> tuple[str, ...]:
    tokens = tuple(text.split()) if isinstance(text, str) else tuple(text)
    for token in tokens:
        if not isinstance(token, str) or not token.isidentifier():
            raise ValueError(f"{what} {text!r}: {token!r} is not an axis name (use names like 't', 'h', 'w')")
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise ValueError(f"{what} {text!r} repeats axis {', '.join(map(repr, duplicates))}; name each axis once")
    return tokens


@lru_cache(maxsize=256)
def _parse(layout: str, axes: tuple[str, ...] | None) -> Layout:
    names = _tokens(layout, "layout")
    for required in ("b", "c"):
        if required not in names:
            raise ValueError(
                f"layout {layout!r} must contain the batch axis 'b' and the channel axis 'c' "
                f"(missing {required!r}); e.g. 'b c t h w' or 'b n c'"
            )
    others = tuple(n for n in names if n not in ("b", "c"))
    if not others:
        raise ValueError(f"layout {layout!r} has no position axis besides 'b' and 'c'; add one, e.g. 'b n c'")
    if axes is None:
        chosen = others
    else:
        chosen_set = _tokens(axes, "axes")
        if not chosen_set:
            raise ValueError(f"axes must name at least one of {others}, got an empty selection")
        unknown = [a for a in chosen_set if a not in others]
        if unknown:
            raise ValueError(
                f"axes {' '.join(chosen_set)!r}: {', '.join(map(repr, unknown))} not a position axis of "
                f"layout {layout!r}; choose among {', '.join(map(repr, others))}"
            )
        chosen = tuple(n for n in others if n in chosen_set)
    return Layout(names, chosen, tuple(n for n in others if n not in chosen))


def parse_layout(layout: str, axes: str | Sequence[str] | None = None) -> Layout:
    """Parse ``layout`` (must contain ``b`` and ``c``) and the interacting ``axes`` (default: all others)."""
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string such as 'b c t h w', got {type(layout).__name__}")
    if axes is not None and not isinstance(axes, str):
        axes = tuple(axes)
    elif isinstance(axes, str):
        axes = tuple(axes.split())
    return _parse(layout, axes)


def axis_dims(layout: str, axes: Sequence[str], ndim: int) -> list[int]:
    """The dims of ``axes`` in ``layout``, names of a tensor's ``ndim`` dims (any names, e.g. ``"b t"``;
    unlike ``parse_layout`` no batch or channel axis is required). Raises a ``ValueError`` naming the
    layout when it does not name each dim once or lacks one of ``axes``."""
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string such as 'b c t h w', got {type(layout).__name__}")
    names = _tokens(layout, "layout")
    if len(names) != ndim:
        raise ValueError(f"layout {layout!r} must name each of the tensor's {ndim} dims once, it names {len(names)}")
    missing = [a for a in axes if a not in names]
    if missing:
        raise ValueError(f"axes {missing} are not in layout {layout!r}; choose among {list(names)}")
    return [names.index(a) for a in axes]


def normalise_sub_sample(sub_sample: bool | dict[str, int] | None, axes: tuple[str, ...]) -> dict[str, int]:
    """Pooling factor per position axis: ``True`` is 2 on every axis but ``t``; a dict names its axes."""
    if sub_sample is None or sub_sample is False:
        return {}
    if sub_sample is True:
        return {a: 2 for a in axes if a != "t"}
    if not isinstance(sub_sample, dict):
        raise TypeError(f"sub_sample must be None, a bool or a dict like {{'h': 2, 'w': 2}}, got {sub_sample!r}")
    unknown = [a for a in sub_sample if a not in axes]
    if unknown:
        raise ValueError(f"sub_sample names {unknown}, which are not among the interacting axes {axes}")
    factors = {axis: positive_int(f"sub_sample[{axis!r}]", factor) for axis, factor in sub_sample.items()}
    return {a: f for a, f in factors.items() if f > 1}


def max_pool_positions(x: Tensor, axes: tuple[str, ...], factors: dict[str, int]) -> Tensor:
    """Max-pool (B', *axes sizes, C) by ``factors`` per axis, dropping a remainder like ``nn.MaxPool``."""
    if not factors:
        return x
    index = [slice(None)] + [slice(0, x.shape[1 + i] - x.shape[1 + i] % factors.get(a, 1)) for i, a in enumerate(axes)]
    sizes = x.shape[1:-1]
    x = x[tuple(index)]
    if any(before and not after for before, after in zip(sizes, x.shape[1:-1])):  # an empty SP shard may stay empty
        raise ValueError(
            f"sub_sample {factors} leaves no positions on an axis of size smaller than its factor "
            f"(position sizes {dict(zip(axes, x.shape[1:-1]))}); lower the factor"
        )
    # Axes named by position (a0 a1 ...) and their windows k0 k1 ...: any user axis name is legal,
    # so no name of theirs may be combined into one of ours (an axis 'h_k' beside 'h' would clash).
    kept = [f"a{i}" for i in range(len(axes))]
    grouped = " ".join(f"(a{i} k{i})" if a in factors else f"a{i}" for i, a in enumerate(axes))
    windows = {f"k{i}": factors[a] for i, a in enumerate(axes) if a in factors}
    return reduce(x, f"b {grouped} c -> b {' '.join(kept)} c", "max", **windows)


def flatten_positions(x: Tensor) -> Tensor:
    """(B', *sizes, C) -> (B', N, C)."""
    return x.flatten(1, -2)


__all__ = ["Layout", "flatten_positions", "max_pool_positions", "normalise_sub_sample", "parse_layout"]
