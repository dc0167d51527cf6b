"""The project's import graph (issue 23): no cycle among the modules of jobs/ and launcher/, imports at module level
and inside functions alike, and the ground floor (the stage contract, the data formats, the metrics) imports no
project module above it. Read from the source with ``ast``: nothing is imported to compute it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "launcher")
GROUND_FLOOR = ("jobs.contract", "jobs.formats", "jobs.metrics")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body: ``import jobs.x``, ``from jobs.x import y``,
    ``from jobs import x`` (x a module) and ``from jobs import __version__`` (the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found.update(submodules or {node.module})
            if len(submodules) < len(node.names):  # names of the module itself, besides its submodules
                found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    """The walk sees what it must for the checks below to mean anything: the packages' modules, and imports at
    module level and inside functions."""
    graph = import_graph()
    assert len(graph) > 30
    assert "jobs.contract" in graph["jobs.prepare"]  # module level: from jobs import contract
    assert "jobs.memory" in graph["jobs.training"]  # inside shard_count: from jobs import memory


def test_a_cycle_is_found_where_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_project_imports_without_a_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_ground_floor_imports_nothing_above_it():
    """Its modules may use one another (a format reads a yes or no as the metrics do; the cycle check above keeps them
    apart), nothing else of the project."""
    graph = import_graph()
    above = {module: sorted(graph[module] - set(GROUND_FLOOR)) for module in GROUND_FLOOR if graph[module] - set(GROUND_FLOOR)}
    assert not above, f"the ground floor imports project modules above it: {above}"
