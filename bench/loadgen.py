"""The load generator: persistent commands with publisher confirms, replies on a named
exclusive queue, matched by correlation id.

It is written on aiormq (the protocol layer under aio-pika) to stay light: the generator
shares two cores with the broker, the database and the worker, and every cycle it spends is
taken from them.

Two shapes:

- closed loop: `window` requests in flight at all times; a slot sends its next request as soon
  as the reply to the previous one arrives. Measures throughput (the system runs flat out).
- open loop: requests are sent on a fixed schedule (`rate` per second) whatever the replies
  do, and latency is measured from the *scheduled* send time, so a stalled worker cannot hide
  its queueing delay (no coordinated omission). Measures latency at a given load.

Latency is always publish-start to reply-received, so it includes the publish confirm, the
broker's queueing, the worker and the reply's way back.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from urllib.parse import unquote, urlsplit

import aiormq
import orjson
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

COMMANDS_EXCHANGE = "identity.commands"
MakeRequest = Callable[[int], tuple[str, bytes]]
"""(sequence number) -> (routing key, body)."""


@dataclass
class Sample:
    """What one measured span produced."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    by_command: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0

    @property
    def completed(self) -> int:
        return len(self.latencies)

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        out: dict[str, float | int | dict[str, int]] = {
            "throughput": round(self.completed / self.seconds, 1),
            "completed": self.completed,
            **latency_summary(self.latencies),
        }
        if self.errors:
            out["errors"] = dict(self.errors)
        if self.lost:
            out["lost"] = self.lost
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    values = sorted(latencies)
    return {
        f"p{int(q * 100)}_ms": round(percentile(values, q) * 1000, 2) for q in (0.5, 0.95, 0.99)
    }


class LoadGenerator:
    def __init__(self, url: str) -> None:
        self._url = url
        self.user = unquote(urlsplit(url).username or "guest")
        self._ids = count()
        self._pending: dict[str, asyncio.Future[tuple[float, bytes]]] = {}
        # Replies to published-only commands (backlogs), counted by correlation id prefix.
        self.unmatched: Counter[str] = Counter()

    async def open(self) -> None:
        self.connection = await aiormq.connect(self._url)
        self._publish = await self.connection.channel(publisher_confirms=True)
        self._replies = await self.connection.channel()
        # A caller is answered only in its own namespace (`<user_id>.`): a broker-named
        # `amq.gen-...` queue is refused as reply_to under a caller policy.
        name = f"{self.user}.bench.{secrets.token_hex(6)}"
        declared = await self._replies.queue_declare(name, exclusive=True, auto_delete=True)
        assert declared.queue is not None
        self.reply_queue = declared.queue
        await self._replies.basic_consume(self.reply_queue, self._on_reply, no_ack=True)

    async def close(self) -> None:
        await self.connection.close()

    async def _on_reply(self, message: DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id or ""
        future = self._pending.pop(correlation_id, None)
        if future is None:
            self.unmatched[correlation_id.split("-", 1)[0]] += 1
        elif not future.done():
            future.set_result((time.perf_counter(), message.body))

    def _properties(self, correlation_id: str, reply: bool = True) -> Basic.Properties:
        return Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            correlation_id=correlation_id,
            reply_to=self.reply_queue if reply else None,
            # The worker authorises by the broker-validated user (the URL's, guest here).
            user_id=self.user,
        )

    async def publish(
        self, routing_key: str, body: bytes, *, reply: bool = True, tag: str = "b"
    ) -> str:
        """Publish one command and wait for its confirm; returns the correlation id."""
        correlation_id = f"{tag}-{next(self._ids)}"
        confirm = await self._publish.basic_publish(
            body,
            exchange=COMMANDS_EXCHANGE,
            routing_key=routing_key,
            properties=self._properties(correlation_id, reply),
        )
        if not isinstance(confirm, Basic.Ack):
            raise RuntimeError(f"publish of {routing_key} not confirmed: {confirm!r}")
        return correlation_id

    async def publish_many(self, requests: list[tuple[str, bytes]], *, tag: str) -> None:
        """A backlog: published 500 at a time, every one confirmed, replies not awaited but
        counted in `unmatched[tag]`."""
        for start in range(0, len(requests), 500):
            chunk = requests[start : start + 500]
            await asyncio.gather(*(self.publish(k, b, tag=tag) for k, b in chunk))

    async def request(self, routing_key: str, body: bytes, sent: float) -> tuple[float, bytes]:
        """Publish and wait for the reply; returns (latency from `sent`, reply body)."""
        correlation_id = f"c{next(self._ids)}"
        future: asyncio.Future[tuple[float, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        confirm = await self._publish.basic_publish(
            body,
            exchange=COMMANDS_EXCHANGE,
            routing_key=routing_key,
            properties=self._properties(correlation_id),
        )
        if not isinstance(confirm, Basic.Ack):
            self._pending.pop(correlation_id, None)
            raise RuntimeError(f"publish of {routing_key} not confirmed: {confirm!r}")
        received, reply = await future
        return received - sent, reply

    async def closed_loop(
        self, make: MakeRequest, *, window: int, warmup: float, seconds: float
    ) -> Sample:
        sample = Sample(seconds)
        sequence = count()
        loop_start = time.perf_counter()
        measure_from, measure_to = loop_start + warmup, loop_start + warmup + seconds

        async def slot() -> None:
            while True:
                sent = time.perf_counter()
                if sent >= measure_to:
                    return
                key, body = make(next(sequence))
                latency, reply = await self.request(key, body, sent)
                done = sent + latency
                if sent >= measure_from and done <= measure_to:
                    _record(sample, key, latency, reply)

        await asyncio.gather(*(slot() for _ in range(window)))
        return sample

    async def open_loop(
        self, make: MakeRequest, *, rate: float, seconds: float, grace: float = 30.0
    ) -> Sample:
        sample = Sample(seconds)
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        start = time.perf_counter()
        n = 0

        async def one(key: str, body: bytes, due: float) -> None:
            try:
                latency, reply = await self.request(key, body, due)
            except (aiormq.exceptions.AMQPError, RuntimeError):
                sample.errors["publish_failed"] += 1
                return
            _record(sample, key, latency, reply)

        while True:
            due = start + n * interval
            if due >= start + seconds:
                break
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            key, body = make(n)
            task = asyncio.create_task(one(key, body, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            _, late = await asyncio.wait(set(tasks), timeout=grace)
            for task in late:
                task.cancel()
            sample.lost = len(late)
        return sample


def _record(sample: Sample, key: str, latency: float, reply: bytes) -> None:
    sample.latencies.append(latency)
    sample.by_command.setdefault(key, []).append(latency)
    if not reply.startswith(b'{"ok":true'):
        code = orjson.loads(reply).get("error", {}).get("code", "unknown")
        sample.errors[code] += 1
