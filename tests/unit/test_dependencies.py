"""The supply chain: every dependency pinned with hashes, installed from the lock, and above
every known advisory (advisories.toml, kept by hand: no audit service is reachable here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("requirements.lock", "requirements-dev.lock")
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.MULTILINE)


def pins(lock: str) -> dict[str, Version]:
    text = (ROOT / lock).read_text()
    return {canonicalize_name(name): Version(version) for name, version in PIN.findall(text)}


def advisories() -> list[dict[str, object]]:
    table = tomllib.loads((ROOT / "advisories.toml").read_text())
    rows: list[dict[str, object]] = table["advisory"]
    return rows


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> list[Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return found


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_of_a_lock_carries_hashes(lock: str) -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / lock).read_text().split("\n", 2)[2])
    assert len(entries) >= 20
    for entry in entries:
        assert "==" in entry, entry
        assert "--hash=sha256:" in entry, f"{entry.splitlines()[0]} has no hash"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_is_above_every_known_advisory(lock: str) -> None:
    pinned = pins(lock)
    for row in advisories():
        name = canonicalize_name(str(row["package"]))
        if name in pinned:
            assert pinned[name] >= Version(str(row["fixed"])), f"{lock}: {name} ({row['id']})"


def test_the_runtime_lock_pins_every_runtime_dependency_and_the_dev_lock_every_extra() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert runtime <= set(pins("requirements.lock"))
    assert {canonicalize_name(r.name) for r in declared()} <= set(pins("requirements-dev.lock"))


def test_direct_dependencies_have_floors_above_their_advisories() -> None:
    floors = {canonicalize_name(r.name): r.specifier for r in declared()}
    for row in advisories():
        if not row["direct"]:
            continue
        name = canonicalize_name(str(row["package"]))
        assert name in floors, f"{name} is marked direct but pyproject.toml does not name it"
        lows = [Version(s.version) for s in floors[name] if s.operator in (">=", ">", "~=", "==")]
        assert lows, f"{name} has no floor in pyproject.toml"
        assert max(lows) >= Version(str(row["fixed"])), f"{name}: floor below {row['id']}"


def test_the_build_backend_floor_is_above_its_advisory() -> None:
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    (setuptools,) = [Requirement(r) for r in build["requires"]]
    fixed = next(Version(str(r["fixed"])) for r in advisories() if r["package"] == "setuptools")
    assert not setuptools.specifier.contains(Version("78.1.0"))
    assert setuptools.specifier.contains(fixed)


def test_make_and_the_image_install_from_the_lock_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements-dev.lock" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --prefix=/install -r requirements.lock" in dockerfile
    assert "--no-deps --prefix=/install ." in dockerfile
