"""A worker's stop, in this process on both brokers (the `broker` fixture): everything it
took was answered and acknowledged, so closing its channels hands nothing back.

A module of its own: the worker of tests/contract/test_pipeline.py would share the queues."""

from __future__ import annotations

import uuid

from aio_pika.abc import AbstractRobustConnection

from tests.support.bus import Bus, queue_depth
from tests.support.eventually import eventually
from tests.support.pipeline import Broker, running_worker
from worker.topology import FAST_QUEUE, PASSWORD_QUEUE


async def test_a_stopped_worker_leaves_nothing_on_its_queues(
    broker: Broker, connection: AbstractRobustConnection
) -> None:
    async with running_worker(broker):
        bus = await Bus.attach(await broker.connect())
        try:
            sent = [
                await bus.command("account.get", {"account_id": "acct_" + "0" * 26})
                for _ in range(20)
            ]
            for n in range(4):
                payload = {
                    "email": f"stop{n}-{uuid.uuid4().hex[:12]}@example.com",
                    "password": f"Stopping-{uuid.uuid4().hex}",
                    "display_name": "Stop",
                }
                sent.append(await bus.command("account.create", payload, uuid.uuid4().hex))
            await eventually(lambda: set(sent) <= set(bus.replies), what="every reply")
        finally:
            await bus.close()

    # Its channels are closed now: a delivery it had not acked would be back on its queue.
    assert await queue_depth(connection, FAST_QUEUE) == 0
    assert await queue_depth(connection, PASSWORD_QUEUE) == 0
    assert [len(bus.replies[c]) for c in sent] == [1] * len(sent)
