"""Run one worker process until it is told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from services.emails import recanonicalised
from stores.postgres import EmailReport, migrate, recanonicalise_emails
from worker.app import Worker
from worker.bootstrap import build
from worker.settings import Settings

log = logging.getLogger("identity.worker")


async def run_worker(settings: Settings, *, migrate_first: bool = True) -> int:
    """Start (migrations, connections), then work until SIGTERM or SIGINT; the exit status.

    A signal during start-up cancels it at once: there is nothing in flight to drain yet.
    Without this, SIGTERM would be ignored where the process is PID 1 (in the container), and
    `docker stop` during migrations would wait out its grace period, then kill.
    """
    starting = asyncio.current_task()
    assert starting is not None
    stopped_by: list[int] = []
    worker: Worker | None = None

    def on_signal(signum: int) -> None:
        stopped_by.append(signum)
        if worker is None:
            starting.cancel()
        else:  # start-up ended in the loop turn that read the signal: drain instead
            worker.request_stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if migrate_first:
            await migrate_database(
                settings.migration_dsn,
                worker_role=settings.worker_role,
                dev_mode=settings.dev_mode,
            )
        parts = await build(settings)  # closes what it opened if cancelled
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        log.info("stopped while starting", extra={"signal": stopped_by[0]})
        return 128 + stopped_by[0]
    worker = Worker(parts)
    if stopped_by:  # the cancel was swallowed somewhere in start-up: the signal still counts
        worker.request_stop()
    await worker.run()  # replaces the handlers with its own: drain, then exit
    return 0


async def migrate_database(
    dsn: str, *, worker_role: str | None = None, dev_mode: bool = False
) -> tuple[list[str], EmailReport]:
    """Apply pending migrations as the schema's owner (`dsn`: the migration URL) and grant
    `worker_role` its privileges (`stores.postgres.migrate`), then move accounts whose
    canonical email changed with the rules (`services.emails`) to their new form: the names
    applied, and what was moved and what could not be. The move needs no key: it rewrites
    `accounts.email_canonical` only (the throttle's keyed tags of an old form are left to
    expire, docs/runbook.md)."""
    applied = await migrate(dsn, worker_role=worker_role, dev_mode=dev_mode)
    report = await recanonicalise_emails(dsn, recanonicalised)
    if report.moved:
        log.info("accounts moved to their new canonical email", extra={"count": len(report.moved)})
    return applied, report
