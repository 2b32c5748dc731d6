"""Where a loaded worker's CPU goes, thread by thread, and how fast the disk syncs.

    .venv/bin/python bench/threads.py account.create [SECONDS] [--rate PER_S]
                                      [--env IDENTITY_NAME=VALUE ...]
    .venv/bin/python bench/threads.py --fsync [SECONDS]

The first form starts a fresh vhost, database and worker like bench/run.py, drives COMMAND in
a closed loop (or, with --rate, an open loop at that rate) and prints the worker's CPU per
command, in all and for each of its threads (from `/proc/<pid>/task/<tid>/stat`; the event
loop's thread is the one whose id is the process id). Threads that exited during the span
(argon2's own, started for every hash) count in the total only. --env gives the worker a
setting, e.g. cheap argon2 parameters, to see what a command costs the event loop when no
hashing competes with it:

    bench/threads.py account.create 20 --rate 14 --env IDENTITY_ARGON2_MEMORY_KIB=8192 \
        --env IDENTITY_ARGON2_TIME_COST=1 --env IDENTITY_ARGON2_PARALLELISM=1

The second form times a 4 KiB write and fsync every 20 ms in /var/tmp, on the disk RabbitMQ
and PostgreSQL write to on a default install.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import as_deployed, cpu_seconds, thread_cpu_seconds
from loadgen import Sample, latency_summary
from scenarios import window_for, worker_under_load


async def per_thread(
    command: str, seconds: float, rate: float | None, settings: dict[str, str]
) -> None:
    async with worker_under_load("thr", **settings) as (state, worker, gen):
        make, window = state.maker(command), window_for(command)

        async def load(span: float) -> Sample:
            if rate is None:
                return await gen.closed_loop(make, window=window, warmup=0, seconds=span)
            return await gen.open_loop(make, rate=rate, seconds=span)

        await load(3)
        before, total_before = thread_cpu_seconds(worker.pid), cpu_seconds(worker.pid)
        sample = await load(seconds)
        after, total_after = thread_cpu_seconds(worker.pid), cpu_seconds(worker.pid)
    done = sample.completed
    loop = "closed loop" if rate is None else f"open loop at {rate:g}/s"
    print(f"{command}: {done / seconds:.2f}/s over {seconds:.0f} s, {loop}")
    total_ms = 1000 * (total_after - total_before) / done
    print(f"  worker, all threads: {total_ms:8.2f} ms/command")
    for tid, spent in sorted(after.items(), key=lambda t: before.get(t[0], 0) - t[1]):
        ms = 1000 * (spent - before.get(tid, 0.0)) / done
        if ms >= 0.01:
            name = "event loop" if tid == worker.pid else f"thread {tid}"
            print(f"  {name:19s}: {ms:8.2f} ms/command")


def fsync_latency(seconds: float) -> None:
    block = os.urandom(4096)
    latencies = []
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as probe:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            os.pwrite(probe.fileno(), block, 0)
            os.fsync(probe.fileno())
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    summary = {**latency_summary(latencies), "max_ms": round(max(latencies) * 1000, 2)}
    print(f"fsync of 4 KiB in /var/tmp, {len(latencies)} times: {summary}")


if __name__ == "__main__":
    as_deployed()
    parser = argparse.ArgumentParser()
    parser.add_argument("command", nargs="?", default="account.create")
    parser.add_argument("seconds", type=float, nargs="?", default=20)
    parser.add_argument("--rate", type=float, help="open loop at this many commands per second")
    parser.add_argument("--env", action="append", default=[], metavar="IDENTITY_NAME=VALUE")
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()
    settings = {}
    for item in args.env:
        name, equals, value = item.partition("=")
        if not (equals and name.startswith("IDENTITY_")):
            parser.error(f"--env takes a worker setting, IDENTITY_NAME=VALUE, not {item!r}")
        settings[name] = value
    if args.fsync:
        fsync_latency(args.seconds)
    else:
        uvloop.run(per_thread(args.command, args.seconds, args.rate, settings))
