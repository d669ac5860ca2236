"""Metadata agreement before the first collective: one small all-gather, the same error on every rank."""
from __future__ import annotations

import struct

import torch
import torch.distributed as dist
from torch import Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_code(value: float) -> int:
    """An exact integer code of a float (its IEEE-754 bits), so it can travel in an int64 tensor."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def exchange_metadata(group, fields: dict[str, int], device: torch.device) -> dict[str, list[int]]:
    """All-gather ``fields`` (name -> int) over ``group``: every rank's value per name.

    All ranks must pass the same field names (``world_size`` is always added), so the one small
    collective matches on every rank and a disagreement surfaces as data, never as a hang.
    """
    names = ["world_size", *fields]
    local = torch.tensor([dist.get_world_size(group), *fields.values()], dtype=torch.int64, device=device)
    table = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, local, group=group)
    rows = torch.stack(table).cpu().tolist()
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def raise_on_mismatch(values: dict[str, list[int]], free: tuple[str, ...], what: str) -> None:
    """Raise the same ``ValueError`` on every rank when a field outside ``free`` differs between ranks."""
    bad = [name for name in values if name not in free and len(set(values[name])) > 1]
    if bad:
        details = "; ".join(f"{name} per rank = {_readable(name, values[name])}" for name in bad)
        raise ValueError(
            f"sequence-parallel ranks disagree before the first collective: {details}. Every rank of the "
            f"group must call {what} with the same settings and shapes (only the number of positions "
            "of each rank's shard may differ)."
        )


def _readable(name: str, codes: list[int]) -> list:
    if name == "dtype":
        return [str(DTYPES[c]) if 0 <= c < len(DTYPES) else c for c in codes]
    if name == "scale":
        return [struct.unpack("<d", struct.pack("<q", c))[0] for c in codes]
    return codes


def dtype_code(t: Tensor) -> int:
    return DTYPES.index(t.dtype) if t.dtype in DTYPES else -1
