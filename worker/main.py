"""Run one worker process until it is told to stop."""

from __future__ import annotations

from stores.migrate import migrate
from worker.app import Worker
from worker.bootstrap import build
from worker.settings import Settings


async def run_worker(settings: Settings, *, migrate_first: bool = True) -> None:
    if migrate_first:
        await migrate(settings.database_url.get_secret_value())
    worker = Worker(await build(settings))
    await worker.run()
