"""Example networks built from non-local blocks, and ``insert_nonlocal`` for networks built elsewhere."""
from __future__ import annotations

from nonlocal_dist.models.c2d import C2DNonLocal
from nonlocal_dist.models.i3d import I3DNonLocal
from nonlocal_dist.models.insert import insert_nonlocal

__all__ = ["C2DNonLocal", "I3DNonLocal", "insert_nonlocal"]
