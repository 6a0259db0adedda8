"""Engine contract v2 (issue 19): the engine's shape before and after, measured on the source.

    .venv/bin/python bench/bench_contract.py --before 4de194b [--after HEAD]

For each tree (a git revision, exported with ``git archive``):

- specs that override the engine's surgery: method classes defining ``inject`` (and, after, those
that
  declare ``sites`` — several kinds of site per position — with the first line of its docstring as
  the reason);
- registries: the nine look-up-by-name tables of the issue, and the type of each (one type = one
idiom);
- package import cycles and layer violations (the walker of tests/test_layers.py: module-level,
  function-local and TYPE_CHECKING imports);
- lines over 100 columns in src/, tests/ and bench/;
- the lines of each method file.

Prints a Markdown table (paste into bench/RESULTS.md). Nothing is timed here: ``make test`` time is
measured separately on the same machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the nine registries of the issue: (label, module, attribute) — an attribute missing in a tree is
#: looked up under its other name
REGISTRIES = [
    ("methods", "deltatune.core.spec", ["METHODS", "_REGISTRY"]),
    ("merge methods", "deltatune.algebra.registry", ["MERGE_METHODS", "_METHODS", "_REGISTRY"]),
    ("codecs", "deltatune.compress.codecs", ["CODECS"]),
    ("CL strategies", "deltatune.continual.strategies", ["STRATEGIES"]),
    ("TTA methods", "deltatune.deploy.base", ["METHODS", "_METHODS", "_REGISTRY"]),
    ("shift tests", "deltatune.deploy.stats", ["TESTS"]),
    ("accuracy estimators", "deltatune.deploy.accuracy", ["ESTIMATORS", "ESTIMATES"]),
    ("models", "deltatune.models.registry", ["MODELS", "_MODELS"]),
    ("data sets", "deltatune.data", ["DATASETS", "_BUNDLED"]),
]

_PROBE = """
import importlib, json, sys
out = {}
for label, module, names in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        out[label] = f"import failed: {type(exc).__name__}"
        continue
    for name in names:
        if hasattr(mod, name):
            out[label] = f"{name}: {type(getattr(mod, name)).__name__}"
            break
    else:
        out[label] = "not found"
print(json.dumps(out))
"""


def export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "src", "tests", "bench"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _comment(path: Path, line: int) -> str:
    """The comment on the first line of a method body (the reason an override gives), if any."""
    lines = path.read_text().splitlines()
    for text in (lines[line - 1], lines[line - 2]):  # on the statement, or on its own line above it
        if "#" in text:
            return text.split("#", 1)[1].strip()
    return ""


def overrides(src: Path) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    injects, sites, reasons = [], [], []
    for path in sorted((src / "deltatune" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "inject":
                    injects.append(node.name)
                    doc = (ast.get_docstring(item) or "").split("\n\n")[0].replace("\n", " ")
                    first = item.body[0]
                    reasons.append((node.name, doc or _comment(path, first.lineno)))
                if isinstance(item, ast.FunctionDef) and item.name == "sites":
                    doc = (ast.get_docstring(item) or "").split("\n\n")[0].replace("\n", " ")
                    sites.append((node.name, doc))
    return injects, sites, reasons


def layers(tree: Path) -> tuple[int, int]:
    sys.path.insert(0, str(REPO / "tests"))
    import test_layers

    test_layers.SRC = tree / "src" / "deltatune"
    graph = test_layers.package_graph()
    return len(test_layers.cycles(graph)), len(test_layers.violations(graph))


def long_lines(tree: Path) -> dict[str, int]:
    return {part: sum(1 for p in (tree / part).rglob("*.py") for line in p.read_text().splitlines()
                      if len(line) > 100) for part in ("src", "tests", "bench")}


def registries(tree: Path) -> dict[str, str]:
    env_path = str(tree / "src")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(REGISTRIES)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def method_lines(tree: Path) -> dict[str, int]:
    return {
        p.stem: len(p.read_text().splitlines())
        for p in sorted((tree / "src/deltatune/methods").glob("*.py"))
        if not p.stem.startswith("_")
    }


def measure(rev: str, work: Path) -> dict:
    tree = export(rev, work / rev.replace("/", "_"))
    injects, sites, reasons = overrides(tree / "src")
    n_cycles, n_violations = layers(tree)
    regs = registries(tree)
    kinds = {v.split(": ", 1)[-1] for v in regs.values()}
    return {
        "rev": rev,
        "inject": injects,
        "inject_reasons": reasons,
        "sites": sites,
        "cycles": n_cycles,
        "violations": n_violations,
        "long_lines": long_lines(tree),
        "registries": regs,
        "registry_types": sorted(kinds),
        "method_lines": method_lines(tree),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--before", default="4de194b", help="git revision before the change")
    ap.add_argument("--after", default="HEAD", help="git revision after it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before, after = (measure(rev, Path(tmp)) for rev in (args.before, args.after))
    rows = [
        (
            "specs overriding `inject` (engine surgery)",
            f"{len(before['inject'])}: {', '.join(before['inject'])}",
            f"{len(after['inject'])}: {', '.join(after['inject'])}",
        ),
        (
            "specs declaring `sites()` (several kinds of site)",
            "-",
            f"{len(after['sites'])}: {', '.join(n for n, _ in after['sites'])}",
        ),
        (
            "registry types among the nine look-up tables",
            f"{len(before['registry_types'])}: {', '.join(before['registry_types'])}",
            f"{len(after['registry_types'])}: {', '.join(after['registry_types'])}",
        ),
        ("package import cycles", before["cycles"], after["cycles"]),
        ("layer violations (package edges)", before["violations"], after["violations"]),
        (
            "lines over 100 columns (src / tests / bench)",
            " / ".join(map(str, before["long_lines"].values())),
            " / ".join(map(str, after["long_lines"].values())),
        ),
    ]
    print(f"| measure | before ({args.before}) | after ({args.after}) |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print("\nWhy each `inject` override stays:")
    for name, doc in after["inject_reasons"]:
        print(f"- {name}: {doc}")
    print("\nWhy each `sites()` declaration:")
    for name, doc in after["sites"]:
        print(f"- {name}: {doc}")
    new = sorted(set(after["method_lines"]) - set(before["method_lines"]))
    if new:
        print(
            "\nNew method files (lines): "
            + ", ".join(f"{n} {after['method_lines'][n]}" for n in new)
        )
    print("\nRegistries (after): " + "; ".join(f"{k}: {v}" for k, v in after["registries"].items()))


if __name__ == "__main__":
    main()
