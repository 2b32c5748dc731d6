"""How fast the outbox relay publishes a backlog: events per second, from a full outbox to an
empty one, on the local RabbitMQ and PostgreSQL.

    .venv/bin/python bench/relay.py                       # every shape, 1 and 2 relays, 3 runs
    .venv/bin/python bench/relay.py --shape single --relays 2 --runs 5
    .venv/bin/python bench/relay.py --outcome --runs 3   # the writing side, per command

Each run gets a fresh vhost and database. The outbox is filled with commands of one shape
(`single`: 10,000 commands of one event, as account.create or session.start write; `mixed`:
commands of 1 to 3 events; `wide`: 60 password changes of 150 events each), a durable queue
is bound to every event type so that the broker routes and stores each one, and 1 or 2 relays
(`worker.outbox.OutboxRelay`, each on its own connections, as in one worker process each)
drain it. The figures, per run: events published / seconds from the first claim to an empty
outbox; the CPU this process spent meanwhile (the relays: claims, publishes, confirms) and the
CPU of the run's PostgreSQL backends, in microseconds per event. On a shared machine the
rate moves with the neighbours' load; the CPU per event much less.

`--outcome` measures the other end instead: the PostgreSQL CPU of a command's transaction
(BEGIN, RECORD_OUTCOME with one event and an idempotency record, COMMIT), one connection,
3,000 commands in a row.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from env import Sandbox, cpu_seconds

from messages.topology import EVENTS_EXCHANGE
from stores import IdempotencyRecord, NewEvent, PostgresIdentityStore, migrate
from worker.metrics import create_metrics
from worker.outbox import OutboxRelay

SHAPES = {
    "single": [1] * 10_000,
    "mixed": [1 + n % 3 for n in range(5_000)],  # 1, 2, 3, 1, 2, 3... (10,000 events)
    "wide": [150] * 60,  # 9,000 events
}
POOL = 4  # connections per relay's store, all opened before the drain
OUTCOMES = 3_000
FILLERS = 8  # commits at once while filling the outbox
BODY = b'{"event_id": "%s", "type": "session.ended", "data": {"session_id": "' + b"s" * 36 + b'"}}'


async def fill(store: PostgresIdentityStore, sizes: list[int]) -> int:
    """Commit one command per entry of `sizes`, with that many events; the events in all."""
    now = datetime.now(UTC)
    commands = []
    n = 0
    for size in sizes:
        events = []
        for _ in range(size):
            n += 1
            event_id = f"evt_{n:026d}"
            events.append(NewEvent(event_id, "session.ended", BODY % event_id.encode(), now))
        commands.append(events)

    async def commit(share: list[list[NewEvent]]) -> None:
        for events in share:
            async with store.unit_of_work() as uow:
                await uow.record_outcome(events, None)

    await asyncio.gather(*(commit(commands[k::FILLERS]) for k in range(FILLERS)))
    return n


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _backends(dsn: str, name: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


async def one_run(shape: str, relays: int) -> tuple[float, float, float]:
    """(events/s, relay CPU us/event, PostgreSQL CPU us/event) of one drain."""
    sandbox = Sandbox()
    try:
        await sandbox.open()
        await migrate(sandbox.database_url)
        filler = await PostgresIdentityStore.connect(sandbox.database_url, max_size=FILLERS)
        try:
            total = await fill(filler, SHAPES[shape])
        finally:
            await filler.close()
        connections = [await aio_pika.connect_robust(sandbox.amqp_url) for _ in range(relays)]
        stores = [
            await PostgresIdentityStore.connect(sandbox.database_url, min_size=POOL, max_size=POOL)
            for _ in range(relays)
        ]
        try:
            setup = await connections[0].channel()
            events = await setup.declare_exchange(
                EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await setup.declare_queue("bench.events", durable=True)
            await queue.bind(events, "#")
            workers = []
            for connection, store in zip(connections, stores, strict=True):
                channel = await connection.channel(publisher_confirms=True)
                metrics = create_metrics()
                workers.append(
                    OutboxRelay(store, channel, EVENTS_EXCHANGE, metrics, lambda: datetime.now(UTC))
                )
            backends = await _backends(sandbox.database_url, sandbox.name)
            pg_before = sum(cpu_seconds(pid) for pid in backends)
            cpu_before, started = _own_cpu(), time.perf_counter()
            published = sum(await asyncio.gather(*(w.drain() for w in workers)))
            while (await stores[0].outbox_backlog(datetime.now(UTC)))[0]:
                published += sum(await asyncio.gather(*(w.drain() for w in workers)))
            elapsed = time.perf_counter() - started
            relay_cpu = _own_cpu() - cpu_before
            pg_cpu = sum(cpu_seconds(pid) for pid in backends) - pg_before
            assert published >= total, (published, total)
            return total / elapsed, 1e6 * relay_cpu / total, 1e6 * pg_cpu / total
        finally:
            for store in stores:
                await store.close()
            for connection in connections:
                await connection.close()
    finally:
        await sandbox.close()


async def outcome_run() -> float:
    """PostgreSQL CPU, in microseconds, of one command's BEGIN, RECORD_OUTCOME and COMMIT."""
    sandbox = Sandbox()
    try:
        await sandbox.open()
        await migrate(sandbox.database_url)
        store = await PostgresIdentityStore.connect(sandbox.database_url, max_size=1)
        try:
            [backend] = await _backends(sandbox.database_url, sandbox.name)
            now = datetime.now(UTC)
            before = cpu_seconds(backend)
            for n in range(OUTCOMES):
                event = NewEvent(f"evt_{n:026d}", "session.ended", BODY % b"x", now)
                record = IdempotencyRecord(f"key-{n}", "session.end", "f" * 64, {"ok": True}, now)
                async with store.unit_of_work() as uow:
                    await uow.record_outcome([event], record)
            return 1e6 * (cpu_seconds(backend) - before) / OUTCOMES
        finally:
            await store.close()
    finally:
        await sandbox.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--relays", type=int, choices=[1, 2, 0], default=0, help="0: both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outcome", action="store_true", help="time RECORD_OUTCOME instead")
    args = parser.parse_args()
    if args.outcome:
        costs = [await outcome_run() for _ in range(args.runs)]
        print(
            f"RECORD_OUTCOME: median {statistics.median(costs):.0f} us of PostgreSQL CPU per"
            f" command  (runs: {', '.join(f'{c:.0f}' for c in costs)})"
        )
        return
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    for shape in shapes:
        for relays in [1, 2] if args.relays == 0 else [args.relays]:
            runs = [await one_run(shape, relays) for _ in range(args.runs)]
            rate, relay_cpu, pg_cpu = (statistics.median(r[k] for r in runs) for k in range(3))
            print(
                f"{shape:7} relays={relays}  median {rate:6.0f} events/s, relay CPU"
                f" {relay_cpu:4.0f} us/event, PostgreSQL CPU {pg_cpu:4.0f} us/event"
                f"  (rates: {', '.join(f'{r[0]:.0f}' for r in runs)})",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
