"""Client-side costs of the broker operations the worker repeats per command, in isolation.

    .venv/bin/python bench/micro.py publish   # aio-pika Exchange.publish vs aiormq basic_publish
    .venv/bin/python bench/micro.py acks      # one basic.ack per delivery vs multiple=True per 16

Each runs on a fresh vhost of the local RabbitMQ, alternates the two ways twice, and prints
the CPU per operation of this process (and, for acks, of RabbitMQ): the numbers behind the
choices in worker/broker.py and worker/acks.py (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import Sandbox, cpu_seconds, pids_named

REPLY = b"x" * 420  # about a session.verify reply
TASKS, EACH = 64, 150  # 64 concurrent publishers, like the fast consumer's prefetch
DELIVERIES = 20_000


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rabbitmq_cpu() -> float:
    return sum(cpu_seconds(pid) for pid in pids_named("beam.smp"))


async def publish(url: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True, arguments={"x-max-length": 1000})

        async def with_aio_pika() -> None:
            for _ in range(EACH):
                message = aio_pika.Message(
                    REPLY,
                    content_type="application/json",
                    correlation_id="c",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(message, routing_key=queue.name, timeout=10)

        async def with_aiormq() -> None:
            underlay = await channel.get_underlay_channel()
            for _ in range(EACH):
                properties = Basic.Properties(
                    content_type="application/json", correlation_id="c", delivery_mode=2
                )
                await underlay.basic_publish(
                    REPLY, routing_key=queue.name, properties=properties, timeout=10
                )

        ways: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("aio-pika Exchange.publish", with_aio_pika),
            ("aiormq basic_publish", with_aiormq),
        ]
        for name, way in ways * 2:
            cpu, started = own_cpu(), time.perf_counter()
            await asyncio.gather(*(way() for _ in range(TASKS)))
            count, wall = TASKS * EACH, time.perf_counter() - started
            per_op = (own_cpu() - cpu) / count * 1e6
            print(f"{name:28} {count / wall:8.0f}/s  client CPU {per_op:6.1f} us per publish")


async def acks(url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        for batch in (1, 16, 1, 16):
            channel = await connection.channel()
            queue = await channel.declare_queue(
                f"micro.acks.{batch}", durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.purge()
            body = aio_pika.Message(b"x" * 300, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            for _ in range(DELIVERIES):
                await channel.default_exchange.publish(body, routing_key=queue.name)
            await asyncio.sleep(1)
            await channel.set_qos(prefetch_count=64)
            done, seen = asyncio.Event(), 0

            async def on_message(
                message: AbstractIncomingMessage, batch: int = batch, done: asyncio.Event = done
            ) -> None:
                nonlocal seen
                seen += 1
                tag = message.delivery_tag or 0
                if batch == 1 or tag % batch == 0 or seen == DELIVERIES:
                    await message.ack(multiple=batch > 1)
                if seen == DELIVERIES:
                    done.set()

            cpu, broker, started = own_cpu(), rabbitmq_cpu(), time.perf_counter()
            tag = await queue.consume(on_message)
            await done.wait()
            wall = time.perf_counter() - started
            mine = (own_cpu() - cpu) / DELIVERIES * 1e6
            theirs = (rabbitmq_cpu() - broker) / DELIVERIES * 1e6
            way = "one ack per delivery" if batch == 1 else f"one ack per {batch} deliveries"
            print(
                f"{way:28} {DELIVERIES / wall:8.0f}/s  client CPU {mine:6.1f} us, "
                f"RabbitMQ CPU {theirs:6.1f} us per delivery"
            )
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
            await channel.close()


async def main(what: str) -> None:
    sandbox = Sandbox()
    try:
        await sandbox.open()
        await (publish if what == "publish" else acks)(sandbox.amqp_url)
    finally:
        await sandbox.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["publish", "acks"])
    uvloop.run(main(parser.parse_args().what))
