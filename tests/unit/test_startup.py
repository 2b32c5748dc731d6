"""A signal while the worker starts: start-up is abandoned at once; a signal that lands as
start-up ends, or whose cancel start-up swallowed, still stops the worker, by its drain."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from worker import main
from worker.settings import Settings


class FakeWorker:
    """Runs until asked to stop; `run` can raise a signal at itself first."""

    signal_on_run = False

    def __init__(self, parts: object) -> None:
        self.parts = parts
        self.stop_requested = asyncio.Event()

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def run(self) -> None:
        if self.signal_on_run:
            # As if the loop had read SIGTERM in the turn that finished start-up: the handler
            # that runs is still start-up's, not this worker's.
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(self.stop_requested.wait(), timeout=5)


@pytest.fixture
async def signals() -> AsyncIterator[None]:
    yield
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)


def settings() -> Any:
    return Settings.model_construct()


async def test_a_signal_during_start_up_abandons_it(
    monkeypatch: pytest.MonkeyPatch, signals: None
) -> None:
    closed: list[str] = []

    async def slow_build(settings: Settings) -> object:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.Event().wait()  # a start-up that would never end by itself
        finally:
            closed.append("what build opened")
        raise AssertionError("not reached")

    monkeypatch.setattr(main, "build", slow_build)
    monkeypatch.setattr(main, "Worker", FakeWorker)

    code = await asyncio.wait_for(main.run_worker(settings(), migrate_first=False), timeout=3)

    assert code == 128 + signal.SIGTERM
    assert closed == ["what build opened"]


async def test_a_signal_read_as_start_up_ends_drains_the_worker(
    monkeypatch: pytest.MonkeyPatch, signals: None
) -> None:
    async def build(settings: Settings) -> object:
        return object()

    class SignalledWorker(FakeWorker):
        signal_on_run = True

    monkeypatch.setattr(main, "build", build)
    monkeypatch.setattr(main, "Worker", SignalledWorker)

    code = await asyncio.wait_for(main.run_worker(settings(), migrate_first=False), timeout=3)

    assert code == 0  # drained and stopped, not cancelled under way


async def test_a_signal_whose_cancel_start_up_swallowed_still_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch, signals: None
) -> None:
    async def stubborn_build(settings: Settings) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        return object()

    monkeypatch.setattr(main, "build", stubborn_build)
    monkeypatch.setattr(main, "Worker", FakeWorker)

    code = await asyncio.wait_for(main.run_worker(settings(), migrate_first=False), timeout=3)

    assert code == 0
