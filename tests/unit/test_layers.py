"""Dependencies point downward only: worker -> services -> stores; messages for everyone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "messages": {"services", "stores", "worker", "client", "aio_pika", "aiormq", "asyncpg"},
    "services": {"worker", "client", "aio_pika", "aiormq", "asyncpg", "prometheus_client"},
    "stores": {"services", "worker", "client", "aio_pika", "aiormq"},
    "client": {"services", "stores", "worker", "asyncpg"},
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
