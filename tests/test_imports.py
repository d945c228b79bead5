"""Who may import whom (docs/architecture.md): the import graph of ``gateway`` and ``flows``.

The graph is read from the source with :mod:`ast`: every ``import`` and ``from … import`` of our
own modules, at the top of a module or inside a function (a lazy import is still a dependency),
including those only for type checking. ``from package import name`` counts as an import of the
module ``package.name`` when that is a module. A new edge that breaks a rule fails the test with
the importing module, the imported one and the rule it breaks; a cycle between modules or between
packages fails it too (imports only for type checking excepted: they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "flows")

#: The composition root builds every adapter and may import anything.
COMPOSITION_ROOT = (
    "gateway.__main__",
    "gateway.app",
    "gateway.cli",
    "gateway.commands",
    "gateway.demo",
    "gateway.demo_data",
)
SIMULATORS = ("gateway.sim",)
WEB = ("gateway.web",)
FLOWS = ("flows",)
SAGA = (
    "gateway.vending",
    "gateway.unknown_collections",
    "gateway.customer_services",
    "gateway.sweeper",
    "gateway.operator",
)
LEDGER = ("gateway.ledger",)
PAYMENTS = ("gateway.payments",)
SMS = ("gateway.sms",)
STS = ("gateway.sts",)
VALUES = ("gateway.values", "gateway.errors", "gateway.retry")
#: The adapters behind the ports: only the composition root (and tests) pick one.
ADAPTERS = (
    "gateway.ledger.sqlite",
    "gateway.ledger.postgres",
    "gateway.payments.daraja",
    "gateway.payments.momo",
    "gateway.payments.airtel",
    "gateway.sms.africastalking",
)


@dataclass(frozen=True)
class Rule:
    """``importers`` (but not ``exempt``) never import ``forbidden`` (but ``allowed``)."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


OURS = PACKAGES
RULES = (
    Rule("gateway/sts/ imports nothing of ours", STS, OURS, allowed=STS),
    Rule("value types import nothing of ours", VALUES, OURS, allowed=VALUES),
    Rule("flows/ imports only flows/ and the value types", FLOWS, OURS, allowed=FLOWS + VALUES),
    Rule(
        "the ledger never imports web, flows, the saga, payments or sms",
        LEDGER,
        WEB + FLOWS + SAGA + PAYMENTS + SMS,
    ),
    Rule(
        "payments never import web, flows, the saga, the ledger or sms",
        PAYMENTS,
        WEB + FLOWS + SAGA + LEDGER + SMS,
    ),
    Rule(
        "sms never imports web, flows, the saga, the ledger or payments",
        SMS,
        WEB + FLOWS + SAGA + LEDGER + PAYMENTS,
    ),
    Rule(
        "web goes through flows, the saga and the ports, never the ledger or an adapter",
        WEB,
        LEDGER + ADAPTERS + STS + ("gateway.sms.outbox",),
    ),
    Rule("the saga uses the ports, never an adapter, web or flows", SAGA, ADAPTERS + WEB),
    Rule(
        "only the composition root imports it, or a simulator",
        OURS,
        COMPOSITION_ROOT + SIMULATORS,
        exempt=COMPOSITION_ROOT + SIMULATORS,
    ),
)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line``; ``typing_only`` under ``TYPE_CHECKING``."""

    importer: str
    imported: str
    line: int
    typing_only: bool


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
            (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
            or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
        ):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _edges_of(importer: str, path: Path) -> Iterator[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = _type_checking_lines(tree)
    modules = _modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(importer, path, node)
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES and target != importer:
                yield Edge(importer, target, node.lineno, node.lineno in typing_only)


@cache
def _edges() -> tuple[Edge, ...]:
    return tuple(edge for name, path in _modules().items() for edge in _edges_of(name, path))


def _violations() -> list[str]:
    found = []
    for edge in _edges():
        for rule in RULES:
            if not _under(edge.importer, rule.importers) or _under(edge.importer, rule.exempt):
                continue
            if _under(edge.imported, rule.forbidden) and not _under(edge.imported, rule.allowed):
                found.append(f"{edge.importer}:{edge.line} imports {edge.imported}: {rule.name}")
    return sorted(set(found))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _package_of(module: str) -> str:
    """``gateway.ledger.base`` → ``gateway.ledger``; ``gateway.vending`` and ``flows.x`` as is."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if len(parts) > 2 or (ROOT / "/".join(parts) / "__init__.py").is_file():
        return ".".join(parts[:2])
    return module


def _runtime_graph(group: Callable[[str], str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {group(name): set() for name in _modules()}
    for edge in _edges():
        source, target = group(edge.importer), group(edge.imported)
        if not edge.typing_only and target in graph and source != target:
            graph[source].add(target)
    return graph


def test_the_graph_is_read() -> None:
    """The reader sees the edges it must (a broken reader would pass every rule)."""
    edges = {(e.importer, e.imported) for e in _edges()}
    assert ("gateway.app", "gateway.vending") in edges
    assert ("gateway.web.ussd", "flows.engine") in edges
    assert ("gateway.ledger.base", "gateway.values.messages") in edges
    assert len(edges) > 250


def test_every_import_follows_the_rules() -> None:
    """No module imports what docs/architecture.md, "Who may import whom", forbids."""
    assert _violations() == []


def test_no_import_cycle_between_modules() -> None:
    """No two modules import each other, directly or around a loop."""
    assert _strongly_connected(_runtime_graph(lambda module: module)) == []


def test_no_import_cycle_between_packages() -> None:
    """No two packages (``gateway/ledger/``, ``gateway/sms/``, …) import each other."""
    assert _strongly_connected(_runtime_graph(_package_of)) == []


def test_only_the_composition_root_builds_the_token_engine() -> None:
    """``LocalTokenEngine`` is imported by ``gateway/sts/`` itself and the composition root only."""
    found = [
        f"{name}:{node.lineno}"
        for name, path in _modules().items()
        if not _under(name, STS + COMPOSITION_ROOT)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.ImportFrom)
        and any(alias.name == "LocalTokenEngine" for alias in node.names)
    ]
    assert found == []


def test_a_rule_breach_is_reported() -> None:
    """The checker flags a forbidden edge (so an empty list above means something)."""
    breach = Edge("gateway.ledger.base", "gateway.sms.base", 1, typing_only=False)
    rule = RULES[3]
    assert _under(breach.importer, rule.importers)
    assert _under(breach.imported, rule.forbidden)


def test_the_port_loads_no_database_driver() -> None:
    """``import gateway.ledger.base`` (or the package) loads neither asyncpg nor aiosqlite."""
    code = (
        "import sys, gateway.ledger, gateway.ledger.base, gateway.vending, gateway.web.admin\n"
        "print(sorted(m for m in ('asyncpg', 'aiosqlite') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]"
