"""The import graph of a package's source tree, read with `ast` (nothing is imported), for
tests/test_imports.py.

Rules:

- Every `import` and `from ... import` counts, wherever it is: module level or inside a
  function (a function-level import still ties the two modules together; it only hides the
  cycle until the function runs).
- Imports under `if TYPE_CHECKING:` do not count: they exist only for the type checker, never
  run, so they cannot take part in an import cycle (and annotations are strings here).
- `import pkg.a.b` and `from pkg.a.b import x` are edges to `pkg.a.b` and to the packages above
  it (`pkg.a`, whose `__init__` runs first), but not to the root package `pkg`, nor to a package
  that contains the importing module (Python has already started importing it). `from pkg.a
  import b`, where `pkg.a.b` is a module, is an edge to `pkg.a.b` as well.
- A private import is `from pkg.x import _name` (one leading underscore, not a dunder) in any
  module other than `pkg.x` itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImportGraph:
    edges: dict[str, set[str]] = field(default_factory=dict)
    """module -> the modules of the tree it imports."""
    private: list[str] = field(default_factory=list)
    """'importer: from x import _name (line n)' for each private import."""

    def cycles(self) -> list[list[str]]:
        """The strongly connected components with more than one module, each sorted, largest first."""
        return sorted((sorted(c) for c in _components(self.edges) if len(c) > 1), key=lambda c: (-len(c), c))


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `src/package`."""
    out: dict[str, Path] = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping the bodies of `if TYPE_CHECKING:` (not their `else`)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def build(src: Path, package: str) -> ImportGraph:
    """The import graph of `src/package` (see the module doc for what counts)."""
    modules = module_names(src, package)
    graph = ImportGraph(edges={m: set() for m in modules})
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            source = _absolute(node, importer, is_package)
            targets.add(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    targets.add(f"{source}.{alias.name}")
                name = alias.name
                private = name.startswith("_") and not name.startswith("__")
                ours = source == package or source.startswith(package + ".")
                if private and ours and source != importer:
                    graph.private.append(f"{importer}: from {source} import {name} (line {node.lineno})")
        for target in targets:
            parts = target.split(".")
            for k in range(2, len(parts) + 1):  # the module and its packages, not the root
                name = ".".join(parts[:k])
                inside = importer == name or importer.startswith(name + ".")
                if name in modules and not inside:
                    graph.edges[importer].add(name)
    return graph


def _components(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, iter(sorted(edges[root]))))
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.add(top)
                    if top == node:
                        break
                out.append(component)
    return out


def describe(graph: ImportGraph, cycles: list[list[str]]) -> str:
    """Each cycle with one path round it, for a failure message."""
    lines = []
    for c in cycles:
        lines.append(f"cycle of {len(c)}: {', '.join(c)}")
        lines.append(f"  e.g. {' -> '.join(_loop(graph.edges, set(c), c[0]))}")
    return "\n".join(lines)


def _loop(edges: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth-first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start]
