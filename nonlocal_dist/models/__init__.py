"""Example networks built from non-local blocks."""
from __future__ import annotations

from nonlocal_dist.models.c2d import C2DNonLocal

__all__ = ["C2DNonLocal"]
