"""What TLS costs a connection: connect and close, plain text against verified TLS, to a
RabbitMQ node and a PostgreSQL server started for the run with certificates from a throwaway
CA (the same nodes as tests/integration/test_tls.py: scripts/rabbit-cluster.sh with one node
and a TLS listener, scripts/pg-failover.sh without a standby, `ssl = on`).

    .venv/bin/python bench/tls_handshake.py --connects 50

For each of AMQP plain, AMQP over TLS with the context built once (what the worker's robust
connection does on every reconnect), AMQP over TLS with a new context each time (what a
short-lived tool does: the CA file read and parsed too), PostgreSQL plain, and PostgreSQL
with `sslmode=verify-full` and a client certificate: the median, minimum and maximum of
`--connects` connects, in milliseconds. A connection is opened per command by nobody: the
worker opens its connections once, so this is a start-up and reconnect cost, not a per-command
one. Loopback only: no network latency, only the handshake's round trips and its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_tls import write_pki
from tests.support.clusters import TMP, PgFailover, RabbitCluster
from tls import TlsFiles, amqp_connect_kwargs


async def timed(connect: Callable[[], Awaitable[Any]], count: int) -> dict[str, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        connection = await connect()
        samples.append((time.perf_counter() - started) * 1000)
        await connection.close()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "min_ms": round(min(samples), 2),
        "max_ms": round(max(samples), 2),
    }


async def measure(rabbit: RabbitCluster, pg: PgFailover, pki: Path, count: int) -> dict[str, Any]:
    ca, client = pki / "ca.pem", pki / "identity-tls-client"
    files = TlsFiles(str(ca), f"{client}.pem", f"{client}.key")
    plain, amqps = rabbit.url(1), rabbit.tls_url(1)
    reused = amqp_connect_kwargs(amqps, files)
    dsn = f"postgresql://postgres@127.0.0.1:{pg.port_a}/postgres"
    verify = f"?sslmode=verify-full&sslrootcert={ca}&sslcert={client}.pem&sslkey={client}.key"
    return {
        "amqp_plain": await timed(lambda: aio_pika.connect(plain), count),
        "amqps_context_reused": await timed(lambda: aio_pika.connect(amqps, **reused), count),
        "amqps_context_per_connect": await timed(
            lambda: aio_pika.connect(amqps, **amqp_connect_kwargs(amqps, files)), count
        ),
        "postgres_plain": await timed(lambda: asyncpg.connect(dsn + "?sslmode=disable"), count),
        "postgres_verify_full": await timed(lambda: asyncpg.connect(dsn + verify), count),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=50)
    args = parser.parse_args()
    pki = TMP / f"identity-tls-bench-{uuid.uuid4().hex[:8]}"
    pki.mkdir()
    write_pki(pki)
    rabbit = RabbitCluster.fresh(nodes=1, tls_dir=pki)
    pg = PgFailover.fresh(standby=False, ssl_dir=pki)
    try:
        rabbit.start()
        pg.start()
        result = asyncio.run(measure(rabbit, pg, pki, args.connects))
    finally:
        rabbit.teardown()
        pg.teardown()
        for path in pki.iterdir():
            path.unlink()
        pki.rmdir()
    print(json.dumps({"connects": args.connects, **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
