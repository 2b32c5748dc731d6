"""The map of the rooms (docs/design.md) holds in the code: each room imports only what the map
lets it, nothing outside tools/ and tests/ imports tools, and no modules import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"

# The project's own rooms, in the map's order; tests may import any of them.
ROOMS = ("messages", "tls", "brokers", "services", "stores", "worker", "courier", "client", "tools")

# What each room never imports: the map's "never imports" column, kept in step by a test.
FORBIDDEN = {
    "messages": {
        "tls",
        "brokers",
        "services",
        "stores",
        "worker",
        "courier",
        "client",
        "tools",
        "aio_pika",
        "aiormq",
        "asyncpg",
    },
    # Encryption in transit, shared by everyone who connects: the standard library only.
    "tls": {
        "messages",
        "brokers",
        "services",
        "stores",
        "worker",
        "courier",
        "client",
        "tools",
        "aio_pika",
        "aiormq",
        "asyncpg",
    },
    # Connecting to the nodes of a RabbitMQ cluster (aio-pika), shared by every room that talks
    # to the broker: it takes the TLS arguments as they come, and imports nothing of the project.
    "brokers": {
        "messages",
        "tls",
        "services",
        "stores",
        "worker",
        "courier",
        "client",
        "tools",
        "asyncpg",
    },
    "services": {
        "tls",
        "brokers",
        "worker",
        "courier",
        "client",
        "tools",
        "aio_pika",
        "aiormq",
        "asyncpg",
        "prometheus_client",
    },
    "stores": {
        "tls",
        "brokers",
        "services",
        "worker",
        "courier",
        "client",
        "tools",
        "aio_pika",
        "aiormq",
    },
    "worker": {"courier", "client", "tools", "aiosmtplib", "jinja2"},
    # The mail sender reads identity.courier and talks SMTP: no rules, no store, no database.
    "courier": {"services", "stores", "client", "tools", "asyncpg"},
    "client": {"services", "stores", "worker", "courier", "tools", "asyncpg"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offending = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_roots(path) & FORBIDDEN[package]
    }
    assert not offending, sorted(offending)


def test_the_import_walker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncpg\nfrom worker.app import Worker\n")
    assert {"asyncpg", "worker"} <= imported_roots(bad)


def _sources(root: Path) -> list[Path]:
    """The Python files under `root`, without hidden folders (.venv, caches) or build output."""
    return sorted(
        path
        for path in root.rglob("*.py")
        if not any(
            part.startswith(".") or part.endswith(".egg-info") or part == "build"
            for part in path.relative_to(root).parts
        )
    )


def test_nothing_but_tools_and_tests_imports_tools() -> None:
    outside = [
        path for path in _sources(ROOT) if path.relative_to(ROOT).parts[0] not in {"tools", "tests"}
    ]
    assert any(path.is_relative_to(ROOT / "bench") for path in outside)
    offending = [str(path.relative_to(ROOT)) for path in outside if "tools" in imported_roots(path)]
    assert not offending


# -- the map in docs/design.md is the table above --------------------------------------------

_ROW = re.compile(
    r"^\| `(?P<room>[a-z_]+)/` \|(?P<what>[^|]+)\|(?P<may>[^|]+)\|(?P<never>[^|]+)\|$"
)


def _names(cell: str) -> set[str]:
    return set(re.findall(r"`([a-z_][a-z0-9_]*)`", cell))


def design_map() -> dict[str, tuple[set[str], set[str]]]:
    """room -> (may import, never imports) as the map in docs/design.md says."""
    rows = {}
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        if match := _ROW.match(line.strip()):
            may = set(ROOMS) if "all of the above" in match["may"] else _names(match["may"])
            rows[match["room"]] = (may - {match["room"]}, _names(match["never"]))
    return rows


def test_design_opens_with_the_map_of_the_rooms() -> None:
    title, first_section, *_ = DESIGN.read_text(encoding="utf-8").split("\n## ")
    assert title.strip().startswith("# ")
    assert "\n" not in title.strip(), "nothing between the title and the map"
    assert first_section.startswith("The rooms\n"), first_section[:40]
    assert list(design_map()) == [*ROOMS, "tests"]


def test_the_map_forbids_exactly_what_the_layer_test_forbids() -> None:
    mapped = design_map()
    assert {room: never for room, (_, never) in mapped.items() if never} == FORBIDDEN
    for room, (may, never) in mapped.items():
        # Every other room of the project is either allowed or forbidden, never both.
        assert not may & never, room
        assert may | (never & set(ROOMS)) == set(ROOMS) - {room}, room


# -- no import cycles ------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(name: str, known: set[str]) -> str | None:
    """`name` or the closest package above it that is one of `known`."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _names_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(path: Path, package: str) -> set[str]:
    """Every dotted name `path` imports, anywhere in its text (functions included), absolute.

    `from pkg import x` gives `pkg.x`: x may be a module; `_target` finds what it is.
    """
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # What only the type checker reads (`if TYPE_CHECKING:`) never runs: annotations naming
    # each other are not modules importing each other.
    for guarded in ast.walk(tree):
        if isinstance(guarded, ast.If) and _names_type_checking(guarded.test):
            guarded.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = {module_name(p, root): p for pkg in packages for p in _sources(root / pkg)}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {_target(imported, known) for imported in _imported_names(path, package)}
        graph[name] = {target for target in targets if target is not None and target != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach one another through imports (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while (member := stack.pop()) != module:
                group.append(member)
            if group:
                cycles.append(sorted([module, *group]))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_no_modules_import_each_other() -> None:
    graph = import_graph(ROOT, (*ROOMS, "tests"))
    assert {"tools.cli", "worker.main", "tests.unit.test_layers"} <= graph.keys()
    assert "tools.send" in graph["tools.cli"]  # an import inside a function counts too
    assert not import_cycles(graph)


def test_the_cycle_finder_sees_modules_that_import_each_other(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    # a -> b at import time, b -> a only when called: still two modules importing each other.
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.a import A\n")
    # a three-module cycle through a relative import and a package's __init__.
    (package / "sub" / "c.py").write_text("from . import d\n")
    (package / "sub" / "d.py").write_text("import pkg.e\n")
    (package / "e.py").write_text("from pkg.sub import C\n")
    (package / "f.py").write_text("import pkg.a\nimport os\n")  # imports, but nothing back
    # g and h name each other for the type checker only: nothing runs, no cycle.
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import {}\n"
    (package / "g.py").write_text(guarded.format("h"))
    (package / "h.py").write_text(guarded.format("g"))

    graph = import_graph(tmp_path, ("pkg",))

    assert import_cycles(graph) == [
        ["pkg.a", "pkg.b"],
        ["pkg.e", "pkg.sub", "pkg.sub.c", "pkg.sub.d"],
    ]
