"""Fixtures of the fault suite: a fresh environment per scenario, the figures of the run, and
a guarantee that RabbitMQ and PostgreSQL are running when the suite ends, whatever happened."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults import tools

LAST_RUN = Path(__file__).with_name("last-run.json")
_FIGURES: dict[str, dict[str, Any]] = {}
_STARTED = time.monotonic()

TOTALS = (
    "commands_published",
    "duplicates_published",
    "faults_injected",
    "lost_replies",
    "lost_rows",
    "events_lost",
    "duplicated_rows",
    "events_duplicated",
    "events_phantom",
    "inconsistent_replies",
    "stuck_messages",
    "leaked",
)


@pytest.fixture(scope="session", autouse=True)
def services_left_running() -> Iterator[None]:
    """Whatever a scenario did, both servers answer again before the session ends."""
    yield
    tools.ensure_postgres()
    tools.ensure_broker()
    assert tools.pg_ready(), "PostgreSQL is not answering after the fault suite"
    assert tools.broker_running(), "RabbitMQ is not answering after the fault suite"


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, dict[str, Any]]]:
    """Scenario name -> its figures; written to tests/faults/last-run.json at the end."""
    yield _FIGURES
    if not _FIGURES:
        return
    totals = {
        name: sum(int(f.get(name, 0)) for f in _FIGURES.values() if isinstance(f, dict))
        for name in TOTALS
    }
    document = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - _STARTED, 1),
        "totals": totals,
        "scenarios": _FIGURES,
    }
    LAST_RUN.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


@pytest.fixture
async def fault_env(tmp_path: Path) -> AsyncIterator[tools.Environment]:
    """A fresh vhost and database for one scenario; its workers are killed afterwards."""
    async with tools.environment(tmp_path) as env:
        yield env
