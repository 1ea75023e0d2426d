"""The project's imports form a clean stack: no module import cycle (function-level imports included), and
no package imports one above it.

    pipeline/            driver, loop, CLI, reports, data, built-in models   (imports everything below)
    workers/  rewards/   the actors: rollout and trainer; reward and pairs  (import only common/, not each other)
    common/              config types, records, errors, method registry, progress counters (imports nothing above)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"common": 0, "rewards": 1, "workers": 1, "pipeline": 2}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (package-relative names)."""
    modules = {
        (pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"): f
        for pkg in LAYER
        for f in sorted((ROOT / pkg).glob("*.py"))
    }
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_package_is_scanned():
    graph = import_graph()
    for pkg in LAYER:
        assert any(m.startswith(f"{pkg}.") for m in graph), f"no modules found in {pkg}/"
    assert "pipeline.driver" in graph["pipeline.cli"] or any("pipeline.driver" in t for t in graph.values())


def test_no_module_import_cycle():
    assert cycles(import_graph()) == []


def test_no_package_imports_one_above_or_beside_it():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if (a := module.split(".")[0]) != (b := target.split(".")[0]) and LAYER[b] >= LAYER[a]
    ]
    assert upward == []


# A module that grows past this holds several ideas: split it where they part (README, the layout).
MAX_LINES = 450


def test_no_module_outgrows_one_idea():
    long = {
        str(f.relative_to(ROOT)): n
        for pkg in LAYER
        for f in sorted((ROOT / pkg).glob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
