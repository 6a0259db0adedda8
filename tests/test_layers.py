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


def _modules() -> set[str]:
    return {_module_name(path)[0] for path in SRC.rglob("*.py")}


def _imports(source: str, package: list[str], modules: set[str]) -> list[tuple[str, int]]:
    """Every deltatune module a file imports, with its line, wherever the import statement is.

    ``package``: the file's package as parts (relative imports are resolved against it);
    ``modules``: the dotted names of deltatune's modules, so that ``from pkg import sub`` counts as
    importing ``pkg.sub`` when ``sub`` is a module (``from .. import deploy``: deltatune.deploy).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x / from ..x: resolved against the importing file's package
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
        elif isinstance(node, ast.Call) and _literal_import_module(node):
            found.append((node.args[0].value, node.lineno))
    return [(t, line) for t, line in found if t == "deltatune" or t.startswith("deltatune.")]


def _literal_import_module(call: ast.Call) -> bool:
    """``importlib.import_module("deltatune....")`` / ``import_module(...)`` with a literal name."""
    name = getattr(call.func, "attr", getattr(call.func, "id", None))
    first = call.args[0] if call.args else None
    literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
    return name == "import_module" and literal


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{importing package: {imported package: ["file:line -> module", ...]}}, across packages."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    modules = _modules()
    for path in sorted(SRC.rglob("*.py")):
        module, package = _module_name(path)
        source = _package(module)
        for target, line in _imports(path.read_text(encoding="utf-8"), package, modules):
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
                out.append(f"{source} imports {dest}, which only cli may import: "
                           + "; ".join(where))
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
    header = "layer violations (ARCHITECTURE.md, 'Arrows point inward'):\n"
    assert not problems, header + "\n".join(problems)


def test_package_graph_has_no_cycle():
    graph = package_graph()
    found = cycles(graph)
    lines = []
    for cycle in found:
        steps = [f"{a} -> {b} ({graph[a][b][0]})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        lines.append(" -> ".join(cycle + cycle[:1]) + ":\n    " + "\n    ".join(steps))
    assert not found, f"{len(found)} import cycle(s) between packages:\n" + "\n".join(lines)


def test_the_checks_catch_hidden_imports_and_name_each_cycle():
    source = '''
from typing import TYPE_CHECKING
from . import lora
from ..core import spec
if TYPE_CHECKING:
    from ..train.callbacks import BaseCallback
def schedule():
    from ..budget.adalora import AdaLoRASchedule
    import importlib
    return importlib.import_module("deltatune.cli.app")
'''
    modules = {"deltatune.methods.lora", "deltatune.core.spec", "deltatune.budget.adalora"}
    found = {t for t, _ in _imports(source, ["deltatune", "methods"], modules)}
    assert found == {"deltatune.methods.lora", "deltatune.core.spec", "deltatune.train.callbacks",
                     "deltatune.budget.adalora", "deltatune.cli.app"}
    graph = {"methods": {"core": ["m:1"], "budget": ["m:2"]},
             "budget": {"methods": ["b:1"], "cli": ["b:2"]},
             "io": {"core": ["i:1"], "train": ["i:2"]}, "train": {"io": ["t:1"]}, "core": {}}
    assert cycles(graph) == [["budget", "methods"], ["io", "train"]]
    assert violations(graph) == ["budget imports cli, which only cli may import: b:2",
                                 "io may import core, methods, but imports train: i:2",
                                 "methods may import core, but imports budget: m:2"]
