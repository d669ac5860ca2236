"""Imports flow one way: integrations -> maps and mmcv interop -> block -> sharded -> sequence -> distributed -> kernels.

Read from the source (every import statement, those inside functions too; ``TYPE_CHECKING`` blocks
are annotations only), so a lazy import that closes a circle is caught as well as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nonlocal_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The nonlocal_dist modules that ``path`` imports at run time (outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nonlocal_dist"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("nonlocal_dist"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_the_block_is_a_leaf_of_the_maps_and_the_mmcv_interop():
    below = _reachable(_graph(), "nonlocal_dist.block")
    assert not below & {"nonlocal_dist.attention_maps", "nonlocal_dist.interop"}, sorted(below)
    assert "nonlocal_dist.block" not in below, "an import circle through nonlocal_dist.block"


def test_no_import_circles_below_the_package_root():
    graph = _graph()
    circles = [name for name in graph if name in _reachable(graph, name)]
    assert not circles, circles


def test_the_two_packages_stand_on_the_primitives_and_not_on_each_other():
    """``distributed`` (c10d calls, shard arithmetic, mesh groups, agreement, failures) knows neither package
    above it; sequence-parallel attention (``sequence``) does not reach into the sharded runtime."""
    graph = _graph()
    for name in graph:
        below = _reachable(graph, name)
        if name.startswith("nonlocal_dist.distributed"):
            above = sorted(m for m in below if not m.startswith("nonlocal_dist.distributed")
                           and m not in ("nonlocal_dist.conventions", "nonlocal_dist.validate"))
            assert not above, (name, above)
        if name.startswith("nonlocal_dist.sequence"):
            assert not {m for m in below if m.startswith("nonlocal_dist.sharded")}, name
