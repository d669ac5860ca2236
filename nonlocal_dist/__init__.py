"""nonlocal_dist: exact, memory-efficient, sequence-parallel non-local operations."""
from __future__ import annotations

from nonlocal_dist.mkl_dispatch import resolve_vector_math

resolve_vector_math()  # before anything can run a VML op on several threads (see the module)

from nonlocal_dist.backends import BACKENDS
from nonlocal_dist.block import NonLocalBlock
from nonlocal_dist.conventions import MODES
from nonlocal_dist.functional import nonlocal_op
from nonlocal_dist.models.insert import insert_nonlocal
from nonlocal_dist.sharded.distribute import distribute, parallelize

__all__ = ["BACKENDS", "MODES", "NonLocalBlock", "distribute", "insert_nonlocal", "nonlocal_op", "parallelize"]
