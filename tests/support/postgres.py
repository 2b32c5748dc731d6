"""PostgreSQL as a test observes it from outside: who waits for whom."""

from __future__ import annotations

import asyncpg


async def lock_waiters(observer: asyncpg.Connection, holder_pid: int) -> int:
    """How many backends wait on a lock that the backend `holder_pid` holds.

    `observer` must not be inside a transaction: a transaction sees one snapshot of
    pg_stat_activity throughout, and would never see the wait begin.
    """
    waiting = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND $1 = ANY(pg_blocking_pids(pid))",
        holder_pid,
    )
    return int(waiting)
