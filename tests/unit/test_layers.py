"""The import graph of ``service/`` is layered (see README, Layout).

bottom      common, db, events, grid, identifiers, auth, edge, and the top-level modules
            config.py (settings every layer reads) and observability.py (logging, tracing)
capability  every other package under service/ (registry, upstream, telemetry, balancing,
            dispatch, and whatever comes next)
top         app.py, cli.py

A bottom module imports only bottom modules, and the bottom units' imports of each other
form no cycle (so they can be read, and tested, from the bottom up); a capability imports
bottom modules and other capabilities, never app or cli, and the capabilities' imports of
each other form no cycle.
Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
BOTTOM_PACKAGES = frozenset({"common", "db", "events", "grid", "identifiers", "auth", "edge"})
BOTTOM_MODULES = frozenset({"config", "observability"})
TOP_MODULES = frozenset({"app", "cli"})

Graph = Mapping[str, frozenset[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> frozenset[str]:
    """Every ``service.*`` module ``source`` (of ``module``) imports, relative ones resolved.

    ``from service.x import y`` counts as importing ``service.x`` and ``service.x.y`` (y may be
    a submodule); only the part naming the unit matters for the layers.
    """
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name == "service" or name.startswith("service."))


def service_graph(root: Path = SERVICE_DIR) -> dict[str, frozenset[str]]:
    graph: dict[str, frozenset[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        graph[name] = imported_modules(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py"
        )
    return graph


def unit_of(module: str) -> str:
    """The top-level unit under ``service``: a package or module name ('' for service)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(unit: str, packages: frozenset[str]) -> str:
    if unit == "" or unit in BOTTOM_PACKAGES or unit in BOTTOM_MODULES:
        return "bottom"
    if unit in TOP_MODULES:
        return "top"
    if unit in packages:
        return "capability"
    return "unassigned"


def _cycles(edges: Mapping[str, set[str]]) -> Iterator[list[str]]:
    """Some cycle through each strongly connected part of ``edges`` (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> Iterator[list[str]]:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                yield [*stack[stack.index(target) :], target]
            elif target not in state:
                yield from visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            yield from visit(node)


def layer_violations(graph: Graph, packages: frozenset[str]) -> list[str]:
    """Every broken layer rule of ``graph`` (module -> imported modules), as text."""
    problems: list[str] = []
    capability_edges: dict[str, set[str]] = {}
    bottom_edges: dict[str, set[str]] = {}
    for module, imports in sorted(graph.items()):
        unit = unit_of(module)
        layer = layer_of(unit, packages)
        if layer == "unassigned":
            problems.append(
                f"{module}: a top-level module with no layer; add it to BOTTOM_MODULES or "
                "TOP_MODULES (tests/unit/test_layers.py) and the README's Layout"
            )
            continue
        for imported in sorted(imports):
            target_unit = unit_of(imported)
            target = layer_of(target_unit, packages)
            if layer == "bottom" and target in ("capability", "top"):
                problems.append(f"{module} (bottom) imports {imported} ({target})")
            elif layer == "capability" and target == "top":
                problems.append(f"{module} (capability) imports {imported} ({target})")
            elif layer == target == "capability" and target_unit != unit:
                capability_edges.setdefault(unit, set()).add(target_unit)
            elif layer == target == "bottom" and target_unit not in (unit, ""):
                bottom_edges.setdefault(unit, set()).add(target_unit)
    for cycle in _cycles(capability_edges):
        problems.append("capabilities import each other in a cycle: " + " -> ".join(cycle))
    for cycle in _cycles(bottom_edges):
        problems.append("bottom units import each other in a cycle: " + " -> ".join(cycle))
    return problems


def service_packages(root: Path = SERVICE_DIR) -> frozenset[str]:
    return frozenset(p.name for p in root.iterdir() if (p / "__init__.py").is_file())


def test_service_imports_respect_the_layers() -> None:
    assert layer_violations(service_graph(), service_packages()) == []


def test_the_graph_sees_the_known_capability_edges() -> None:
    # A parser that saw nothing would pass the test above; these edges exist on purpose.
    graph = service_graph()
    assert "service.upstream.status" in graph["service.registry.store"]
    assert "service.events.channels" in graph["service.telemetry.servicer"]
    assert "service.registry.servicer" in graph["service.app"]
    assert "service.events.hub" in graph["service.edge.call_guard"]
    assert "service.common.loglimit" in graph["service.events.hub"]


PACKAGES = frozenset({"common", "db", "events", "registry", "upstream", "balancing"})


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (
            {"service.db.queue": frozenset({"service.registry.store"})},
            ["service.db.queue (bottom) imports service.registry.store (capability)"],
        ),
        (
            {"service.config": frozenset({"service.app"})},
            ["service.config (bottom) imports service.app (top)"],
        ),
        (
            {"service.balancing.worker": frozenset({"service.cli"})},
            ["service.balancing.worker (capability) imports service.cli (top)"],
        ),
        (
            {
                "service.registry.store": frozenset({"service.upstream.status"}),
                "service.upstream.status": frozenset({"service.events.payloads"}),
                "service.upstream.sites": frozenset({"service.registry.domain"}),
            },
            [
                "capabilities import each other in a cycle: registry -> upstream -> registry",
            ],
        ),
        (
            {
                "service.balancing.engine": frozenset({"service.registry.store"}),
                "service.registry.store": frozenset({"service.upstream.status"}),
                "service.upstream.status": frozenset({"service.balancing.engine"}),
            },
            [
                "capabilities import each other in a cycle: "
                "balancing -> registry -> upstream -> balancing",
            ],
        ),
        (
            # What the bottom layer had until the call guard moved out of common.
            {
                "service.common.call_guard": frozenset({"service.events.hub"}),
                "service.events.hub": frozenset({"service.common.loglimit"}),
                "service.db.keyset": frozenset({"service.common.pagination"}),
            },
            ["bottom units import each other in a cycle: common -> events -> common"],
        ),
        (
            {"service.helpers": frozenset()},
            [
                "service.helpers: a top-level module with no layer; add it to BOTTOM_MODULES or "
                "TOP_MODULES (tests/unit/test_layers.py) and the README's Layout"
            ],
        ),
        (
            {
                "service.registry.store": frozenset({"service.upstream.status", "service.db.x"}),
                "service.balancing.engine": frozenset({"service.registry.store"}),
                "service.app": frozenset({"service.balancing.engine"}),
                "service.events.payloads": frozenset({"service.events.channels"}),
            },
            [],
        ),
    ],
)
def test_layer_rules(graph: dict[str, frozenset[str]], expected: list[str]) -> None:
    assert layer_violations(graph, PACKAGES) == expected


def test_imports_are_read_from_every_place(tmp_path: Path) -> None:
    package = tmp_path / "service" / "dispatch"
    package.mkdir(parents=True)
    (tmp_path / "service" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "delivery.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import service.common.clock\n"
        "from . import convert\n"
        "from ..registry.store import RegistryStore\n"
        "if TYPE_CHECKING:\n"
        "    from service.app import Service\n"
        "def later() -> None:\n"
        "    from service import cli\n"
    )
    graph = service_graph(tmp_path / "service")
    assert graph["service.dispatch.delivery"] == {
        "service.common.clock",
        "service.dispatch",
        "service.dispatch.convert",
        "service.registry.store",
        "service.registry.store.RegistryStore",
        "service.app",
        "service.app.Service",
        "service",
        "service.cli",
    }
    assert layer_violations(graph, frozenset({"dispatch", "registry"})) == [
        "service.dispatch.delivery (capability) imports service.app (top)",
        "service.dispatch.delivery (capability) imports service.app.Service (top)",
        "service.dispatch.delivery (capability) imports service.cli (top)",
    ]
