"""The code's layout holds: no import cycle among backup_assets' modules (imports inside functions count too: a
lazy import that dodges a cycle is still one), the core never imports Dagster, and the code speaks of the product,
not of the issues it was planned in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "backup_assets"


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the backup_assets modules it imports anywhere in its text (a `from pkg import name` counts as the
    submodule when `name` is one, else as the package)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, package) in mods.items():
        here = mod.split(".") if package else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here[:len(here) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_core_never_imports_dagster():
    core = PACKAGE / "core"
    offenders = [str(p.relative_to(ROOT)) for p in core.rglob("*.py")
                 if re.search(r"^\s*(import dagster|from dagster)", p.read_text(), re.MULTILINE)]
    assert offenders == []


def test_the_code_speaks_of_the_product_not_of_issues():
    pattern = re.compile(r"\bissues? #?\d+\b", re.IGNORECASE)
    offenders = [f"{p.relative_to(ROOT)}:{n}" for folder in ("backup_assets", "backup_assets_tests", "bench")
                 for p in (ROOT / folder).rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


def test_no_module_is_much_over_500_lines():
    """A module a newcomer can read in one sitting; a bigger one is split by what its parts do."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 520} == {}


def test_every_name_the_benches_import_from_the_project_exists():
    """`make bench` is not run by CI; its scripts (and the programs they pass to `python -c`) still name only what
    the project has: a renamed function fails here, not in the next bench run."""
    import importlib

    pattern = re.compile(r"^\s*from (backup_assets[\w.]*|bench[\w.]*) import ([\w, ]+)$", re.MULTILINE)
    missing = []
    for path in (ROOT / "bench").rglob("*.py"):
        for module, names in pattern.findall(path.read_text()):
            found = importlib.import_module(module)
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                if not hasattr(found, name) and not (hasattr(found, "__path__")
                                                     and importlib.util.find_spec(f"{module}.{name}")):
                    missing.append(f"{path.name}: {module}.{name}")
    assert missing == []
