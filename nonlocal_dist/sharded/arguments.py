"""A torch op's arguments normalised once, against torch's own signature.

PyTorch's argument parser accepts numpy's spellings for its builtins (``axis=`` for ``dim=``,
``keepdims=`` for ``keepdim=``, ``x=``/``a=``/``x1=`` for ``input=``, ``x2=`` for ``other=``), the
tensor itself by keyword (``torch.sum(input=x)``), and several overloads per name
(``torch.var(x, True)`` is ``unbiased=True``, ``torch.var(x, 1)`` is ``dim=1``). A rule that reads
``op.args[1]`` or ``op.kwargs["dim"]`` would miss each of them and compute something else.

``normalize`` (called once per intercepted op, before any rule) renames the aliases to the names
the rules read and passes the first argument positionally, for the builtins whose parser accepts
them (decided from the operator's schemas, so a builtin with a real parameter named ``x`` keeps
it). ``bind`` returns the arguments by name of the overload torch would take, defaults filled.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import Tensor

_ALIASES = {"axis": "dim", "keepdims": "keepdim", "x": "input", "a": "input", "x1": "input", "x2": "other"}
_BUILTIN = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)


@functools.cache
def schemas(func) -> tuple:
    """The aten schemas of a builtin torch function or Tensor method (none for Python functions)."""
    if not isinstance(func, _BUILTIN):
        return ()
    name = getattr(func, "__name__", "")
    found = torch._C._jit_get_schemas_for_operator(f"aten::{name}") if name else []
    return tuple(s for s in found if not any("Dimname" in str(a.type) for a in s.arguments))


@functools.cache
def _renames(func) -> dict[str, str]:
    """alias -> name for the aliases ``func``'s parser accepts (the name is a parameter, the alias not)."""
    names = {a.name for s in schemas(func) for a in s.arguments}
    return {alias: name for alias, name in _ALIASES.items()
            if alias not in names and (name in names or (name == "input" and "self" in names))}


def normalize(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with numpy aliases renamed and a keyword first tensor made positional."""
    if not kwargs:
        return args, kwargs
    renames = _renames(func)
    if not renames and "input" not in kwargs:
        return args, kwargs
    kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
    if not args and schemas(func) and "input" in kwargs:
        args = (kwargs.pop("input"),)
    return args, kwargs


def _fits(value, kind: str) -> bool:
    """Whether torch's parser would accept ``value`` for a parameter of schema type ``kind``."""
    if kind.startswith("Optional["):
        return value is None or _fits(value, kind[len("Optional["):-1])
    if kind in ("Tensor", "Tensor(a)", "Tensor(a!)"):
        return isinstance(value, Tensor)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "SymInt"):  # dtypes, layouts and memory formats print as int in schemas
        return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(
            value, (torch.dtype, torch.layout, torch.memory_format))
    if kind in ("List[int]", "List[SymInt]"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(isinstance(i, int) and not isinstance(i, bool) for i in items)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float, complex)) or (isinstance(value, Tensor) and value.dim() == 0)
    if kind == "List[Tensor]":
        return isinstance(value, (list, tuple)) and all(isinstance(t, Tensor) for t in value)
    if kind == "str":
        return isinstance(value, str)
    return True  # devices, layouts, generators...: no overload turns on them


def bind(func, args: tuple, kwargs: dict) -> dict | None:
    """The arguments by name (``self`` named ``input``) of the first overload of ``func`` they fit,
    defaults filled; None for a function without schemas or arguments no overload takes."""
    for schema in schemas(func):
        params = [a for a in schema.arguments if a.name != "out" or "out" in kwargs]
        positional = [a for a in params if not a.kwarg_only]
        if len(args) > len(positional) or any(k not in {a.name for a in params} for k in kwargs):
            continue
        bound, used = {}, 0
        for a in params:
            name = "input" if a.name == "self" else a.name
            if not a.kwarg_only and used < len(args):
                value, used = args[used], used + 1
            elif a.name in kwargs:
                value = kwargs[a.name]
            elif a.has_default_value():
                bound[name] = a.default_value
                continue
            else:
                break
            if not _fits(value, str(a.type)):
                break
            bound[name] = value
        else:
            return bound
    return None
