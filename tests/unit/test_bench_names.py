"""A benchmark script runs with bench/ first on its path: a script named like one of the
project's packages would be imported in its place, and every benchmark loading it would fail."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_bench_script_is_named_like_a_package_of_the_project() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert {"tls", "brokers", "worker", "client"} <= packages
    assert not scripts & packages
