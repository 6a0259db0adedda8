"""The package layers of ARCHITECTURE.md, checked on the source: arrows point inward, no cycles.

Every ``import`` / ``from ... import`` in src/deltatune is read with :mod:`ast` — at module level,
inside functions and methods, and inside ``if TYPE_CHECKING:`` blocks — with relative imports
resolved. ``TYPE_CHECKING`` imports are counted on purpose: they do not run, but an annotation that
names an outer layer's class is still a dependency on that layer, and such blocks are the usual way
an import cycle gets hidden rather than removed. ``importlib.import_module("deltatune....")`` with
a literal name counts too.

Rules (package = the first name under ``deltatune``; the root ``deltatune/__init__.py`` is the
public facade, ``<root>`` here):

- ``core`` imports nothing of deltatune outside ``core``;
- ``methods`` imports only ``core``; ``io`` only ``core`` and ``methods``;
- nothing imports ``cli`` or the root facade but ``cli`` itself (and ``deltatune/__main__``);
- the package graph has no cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deltatune"
ROOT = "<root>"
ALLOWED = {"core": set(), "methods": {"core"}, "io": {"core", "methods"}}
OUTERMOST = {"cli", ROOT}  # imported by nothing else
FACADE_USERS = {"cli", "__main__"}


def _module_name(path: Path) -> tuple[str, list[str]]:
    """(dotted module name, the package it lives in as a list of parts) for a file under SRC."""
    parts = ["deltatune", *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every deltatune module ``path`` imports, with its line, wherever the import statement is."""
    _, package = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x / from ..x: resolved against the importing file's package
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` may name a submodule; the package is what matters here
            found.append((target, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return [(t, line) for t, line in found if t == "deltatune" or t.startswith("deltatune.")]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{importing package: {imported package: ["file:line -> module", ...]}}, other packages only."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(SRC.rglob("*.py")):
        module, _ = _module_name(path)
        source = _package(module)
        for target, line in _imports(path):
            dest = _package(target)
            if dest != source:
                graph[source][dest].append(f"{path.relative_to(SRC.parent)}:{line} -> {target}")
    return graph


def violations(graph) -> list[str]:
    out = []
    for source, targets in sorted(graph.items()):
        for dest, where in sorted(targets.items()):
            if source in ALLOWED and dest not in ALLOWED[source]:
                allowed = ", ".join(sorted(ALLOWED[source])) or "nothing outside itself"
                out.append(f"{source} may import {allowed}, but imports {dest}: {'; '.join(where)}")
            elif dest in OUTERMOST and source not in FACADE_USERS:
                out.append(f"{dest} is imported by nothing, but {source} imports it: {'; '.join(where)}")
    return out


def cycles(graph) -> list[list[str]]:
    """Elementary cycles of the package graph, each once (rotated to start at its smallest name)."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph.get(node, {}):
            if nxt == start:
                found.add(tuple(path))
            elif nxt not in path and nxt > start:  # each cycle is found from its smallest node only
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(found)]


def test_the_walk_sees_function_local_and_relative_imports():
    graph = package_graph()
    # cli imports most packages inside its command functions: the walk must see them
    assert {"core", "io", "methods", "train", "deploy"} <= set(graph["cli"])
    assert all(p == ROOT or (SRC / p).is_dir() for g in graph.values() for p in g)


def test_inner_layers_import_only_inward():
    problems = violations(package_graph())
    assert not problems, "layer violations (ARCHITECTURE.md, 'Arrows point inward'):\n" + "\n".join(problems)


def test_package_graph_has_no_cycle():
    graph = package_graph()
    found = cycles(graph)
    lines = []
    for cycle in found:
        steps = [f"{a} -> {b} ({graph[a][b][0]})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        lines.append(" -> ".join(cycle + cycle[:1]) + ":\n    " + "\n    ".join(steps))
    assert not found, f"{len(found)} import cycle(s) between packages:\n" + "\n".join(lines)
