"""The packages' import boundaries, read from the source with `ast` (nothing is imported).

The gateway (`lb`) is a library that knows nothing of what drives it; the control plane
(`lb_operator`) meets it only at its public boundary (the Model schema, the registry, the Scaler
protocol, the config decoder); the simulator (`kvgate_sim`) stands alone; process wiring
(`kvgate`) and `bench` sit above. Every import counts: absolute and relative, at module level or
inside a function. A failure names file:line and the edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package name it installs as (pyproject's package-dir)
PACKAGES = {"lb": "lb", "operator": "lb_operator", "kvgate": "kvgate", "bench": "bench",
            "sim": "kvgate_sim"}
OPERATOR_MAY_USE = ("lb.model", "lb.registry", "lb.scaler", "lb.config", "lb.schema")
FORBIDDEN_PACKAGES = {
    "lb": ("lb_operator", "bench", "kvgate", "kvgate_sim"),
    "lb_operator": ("kvgate", "bench", "kvgate_sim"),
    "kvgate_sim": ("lb", "lb_operator", "bench", "kvgate"),
}


@dataclass(frozen=True, slots=True)
class Edge:
    """One imported name: `target` is a module, or `module.name` for a from-import."""

    source: str  # importing module
    target: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target}"


def _modules() -> Iterator[tuple[str, Path]]:
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        if not base.is_dir():
            continue  # e.g. the simulator before it has its own top-level package
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def _package_of(module: str, path: Path) -> str:
    """The package a relative import starts from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _edges(module: str, path: Path) -> Iterator[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(module, alias.name, f"{where}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module, path)
            for alias in node.names:
                yield Edge(module, f"{origin}.{alias.name}", f"{where}:{node.lineno}")


ALL_EDGES = [edge for module, path in _modules() for edge in _edges(module, path)]


def _top(name: str) -> str:
    return name.split(".")[0]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violation(edge: Edge) -> str | None:
    """Why this edge crosses a boundary, or None."""
    source, target = _top(edge.source), edge.target
    for forbidden in FORBIDDEN_PACKAGES.get(source, ()):
        if _within(target, forbidden):
            return f"{source} must not import {forbidden}"
    if source == "lb_operator" and _top(target) == "lb":
        if not any(_within(target, allowed) for allowed in OPERATOR_MAY_USE):
            return f"lb_operator may import from lb only {', '.join(OPERATOR_MAY_USE)}"
        private = [part for part in target.split(".")[1:] if part.startswith("_")]
        if private:
            return f"lb_operator may use only public names of lb ({private[0]} is private)"
    return None


def test_no_forbidden_imports() -> None:
    found = [f"{edge}  [{why}]" for edge in ALL_EDGES if (why := _violation(edge))]
    assert not found, "imports across a boundary:\n" + "\n".join(found)


def _unit(module: str) -> str:
    """The unit the cycle check sees: a top-level package, or one of the control plane's parts
    (its runtime-agnostic core, `kube`, `local`), so neither runtime leans on the other."""
    parts = module.split(".")
    if parts[0] == "lb_operator" and len(parts) > 1 and parts[1] in ("kube", "local"):
        return ".".join(parts[:2])
    return parts[0]


def _unit_graph() -> dict[str, dict[str, Edge]]:
    names = {module for module, _ in _modules()}
    units = {_unit(name) for name in names}
    graph: dict[str, dict[str, Edge]] = {unit: {} for unit in units}
    for edge in ALL_EDGES:
        target = edge.target if edge.target in names else edge.target.rpartition(".")[0]
        if target not in names and _top(target) not in units:
            continue  # the standard library or a dependency
        source_unit, target_unit = _unit(edge.source), _unit(target)
        if target_unit in units and source_unit != target_unit:
            graph[source_unit].setdefault(target_unit, edge)
    return graph


def _cycle(graph: dict[str, dict[str, Edge]]) -> list[str] | None:
    """One cycle as a path of units, or None (depth-first search with a stack of the path)."""
    done: set[str] = set()

    def visit(unit: str, path: list[str]) -> list[str] | None:
        if unit in path:
            return path[path.index(unit):] + [unit]
        if unit in done:
            return None
        for nxt in sorted(graph[unit]):
            found = visit(nxt, path + [unit])
            if found:
                return found
        done.add(unit)
        return None

    for unit in sorted(graph):
        found = visit(unit, [])
        if found:
            return found
    return None


def test_no_import_cycles_between_packages() -> None:
    graph = _unit_graph()
    cycle = _cycle(graph)
    if cycle:
        edges = [str(graph[a][b]) for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(edges))


def test_the_checks_see_the_code() -> None:
    """The walk reads every package (a wrong root would pass everything)."""
    tops = {_top(module) for module, _ in _modules()}
    assert {"lb", "lb_operator", "kvgate", "bench"} <= tops
    seen = {(edge.source, edge.target) for edge in ALL_EDGES}
    assert ("kvgate.cli", "lb.app.Gateway") in seen
    assert ("kvgate.cli", "kvgate_sim.cli.main") in seen, "imports inside functions count too"


def test_the_rules_catch_what_they_should() -> None:
    """The checks themselves, on made-up edges: a rule that never fires would pass any tree."""
    def edge(source: str, target: str) -> Edge:
        return Edge(source, target, "x.py:1")

    crossing = [edge("lb.app", "lb_operator.kube.manager.ClusterOperator"),
                edge("lb_operator.kube.manager", "lb.app.Gateway"),
                edge("lb_operator.local.supervisor", "lb.server.serve"),
                edge("lb_operator.system_config", "lb.config._private"),
                edge("lb_operator.adapters", "kvgate.settings.Settings"),
                edge("kvgate_sim.cli", "lb.model.Model")]
    assert [e for e in crossing if not _violation(e)] == []
    assert _violation(edge("lb_operator.kube.endpoints", "lb.registry.Endpoint")) is None
    relative = ast.parse("from ..retry import Backoff").body[0]
    assert isinstance(relative, ast.ImportFrom)
    assert _resolve(relative, "lb_operator.kube.manager", Path("kube/manager.py")) == "lb_operator.retry"
    loop = {"a": {"b": edge("a", "b.x")}, "b": {"a": edge("b", "a.y")}}
    assert _cycle(loop) == ["a", "b", "a"]
