"""Mesh groups: the process group of each sharded axis, and one group spanning a mesh's ranks."""
from __future__ import annotations

from typing import Sequence

import torch.distributed as dist


def mesh_groups(mesh, axes: Sequence[str]) -> tuple[dist.ProcessGroup, ...]:
    """One process group per axis: ``mesh`` a group, a tuple of groups, or a DeviceMesh."""
    if isinstance(mesh, dist.ProcessGroup):
        groups = (mesh,)
    elif isinstance(mesh, (tuple, list)) and all(isinstance(g, dist.ProcessGroup) for g in mesh):
        groups = tuple(mesh)
    elif hasattr(mesh, "get_group") and hasattr(mesh, "mesh_dim_names"):
        names = mesh.mesh_dim_names
        if names and all(a in names for a in axes):
            groups = tuple(mesh.get_group(a) for a in axes)
        else:
            groups = tuple(mesh.get_group(i) for i in range(mesh.ndim))
    else:
        raise TypeError(f"mesh must be a torch.distributed ProcessGroup, a tuple of them or a DeviceMesh, got {mesh!r}")
    if len(groups) != len(axes):
        raise ValueError(f"{len(axes)} sharded axes {tuple(axes)} need as many mesh dims, got {len(groups)}; "
                         "give one axis per mesh dim (or name the DeviceMesh dims after the axes)")
    return groups


_SPANS: dict[tuple, tuple[dist.ProcessGroup, tuple[tuple[int, ...], ...]]] = {}  # group, coordinates


def covered(group) -> frozenset[int]:
    """The ids of the groups whose ranks ``group`` splits a dim over: itself, and for a span of mesh
    dims (``span_group``) each of those dims' groups too. Two shards of one tensor must not share
    any: a dim split over a span and another over one of its lines would hold only where they meet.
    Read from the live spans (identity, not a remembered id: a group made after a span was dropped
    may reuse its id, differently on each rank)."""
    for lines, (span, _) in _SPANS.items():
        if span is group:
            return frozenset(map(id, lines)) | {id(group)}
    return frozenset((id(group),))


def _span_ranks(groups: tuple) -> list[int]:
    """Global ranks of the mesh spanned by ``groups`` (this rank's line along each mesh dim), row-major."""
    line = dist.get_process_group_ranks(groups[-1])
    if len(groups) == 1:
        return line
    inner = _span_ranks(groups[1:])
    rows: list = [None] * dist.get_world_size(groups[0])
    dist.all_gather_object(rows, inner, group=groups[0])
    return [r for row in rows for r in row]


def span_group(groups) -> dist.ProcessGroup:
    """One process group over every rank of the mesh spanned by ``groups``: this rank's process
    group along each mesh dim, outermost first (a 2 x 2 mesh: its t-line and its h-line give all
    four ranks). Collective over the span on first use (every rank of it calls with its own lines,
    in the same order), cached per tuple of groups afterwards. The new group's rank order is the
    global rank order, which need not be the mesh's: use it where the order of the ranks does not
    matter (sums over every position, as the non-local operation's over j)."""
    return _span(tuple(groups))[0]


def span_coordinates(groups) -> tuple[tuple[int, ...], ...]:
    """For each rank of ``span_group(groups)`` (in its rank order), its index along each mesh dim:
    every rank's piece of a tensor sharded over the mesh, known without a collective after the span
    group exists (a 2 x 2 mesh whose global ranks run t-major: ((0, 0), (0, 1), (1, 0), (1, 1)))."""
    return _span(tuple(groups))[1]


def _span(groups: tuple) -> tuple[dist.ProcessGroup, tuple[tuple[int, ...], ...]]:
    if len(groups) == 1:
        return groups[0], tuple((r,) for r in range(dist.get_world_size(groups[0])))
    if groups not in _SPANS:
        ranks = _span_ranks(groups)
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"the mesh dims' groups overlap (ranks {ranks}): they must be the lines of one mesh")
        worlds = [dist.get_world_size(g) for g in groups]
        coordinates = {}
        for position, global_rank in enumerate(ranks):  # row-major over the mesh dims
            index = []
            for world in reversed(worlds):
                position, i = divmod(position, world)
                index.append(i)
            coordinates[global_rank] = tuple(reversed(index))
        group = dist.new_group(sorted(ranks), use_local_synchronization=True)
        _SPANS[groups] = group, tuple(coordinates[r] for r in sorted(ranks))
    return _SPANS[groups]
