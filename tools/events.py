"""`EventTap`: the events that the demo's own commands caused, as they arrive.

The queue is server-named, exclusive and auto-delete, bound to `identity.events` with `#`:
it lives only as long as the demo's connection, so the demo leaves nothing on the broker
(unlike `client.subscribe`, whose durable queue is meant to outlive its subscriber). Events
are kept only when their `causation_id` is one of the idempotency keys announced through
`expect_causation`, which keeps another client's traffic out of the story.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import ValidationError

from messages import AccountCreated, Event, SessionEnded, SessionStarted, parse_event
from messages.topology import EVENTS_EXCHANGE

# (event type, session.ended reason or None)
EventKind = tuple[str, str | None]


def kind_of(event: Event) -> EventKind:
    return (event.type, event.data.reason if isinstance(event, SessionEnded) else None)


def describe(event: Event) -> str:
    """One line per event: its type and the id it is about."""
    if isinstance(event, AccountCreated):
        about = event.data.account.id
    elif isinstance(event, SessionStarted):
        about = event.data.session.id
    elif isinstance(event, SessionEnded):
        about = f"{event.data.session_id} ({event.data.reason})"
    else:
        about = event.event_id
    return f"      event {event.type} {about}"


class EventTap:
    """Collects the events caused by announced idempotency keys, each `event_id` once."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._causes: set[str] = set()
        self._events: dict[str, Event] = {}
        self._lines: list[str] = []
        self._arrived = asyncio.Condition()

    @classmethod
    async def open(cls, connection: AbstractConnection) -> EventTap:
        channel = await connection.channel()
        # Passive: the exchange is the worker's; the demo declares only its own queue.
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        tap = cls(channel)
        await queue.consume(tap._on_message, no_ack=True)
        return tap

    def expect_causation(self, idempotency_key: str) -> None:
        self._causes.add(idempotency_key)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = parse_event(message.body)
        except ValidationError:
            return  # not ours to judge: the demo checks its own events only
        if event.causation_id not in self._causes or event.event_id in self._events:
            return
        self._events[event.event_id] = event
        self._lines.append(describe(event))
        async with self._arrived:
            self._arrived.notify_all()

    def take_lines(self) -> list[str]:
        """The lines of the events that arrived since the last call."""
        lines, self._lines = self._lines, []
        return lines

    def tally(self) -> Counter[EventKind]:
        return Counter(kind_of(event) for event in self._events.values())

    async def wait_for(self, expected: Counter[EventKind], timeout_s: float) -> Counter[EventKind]:
        """The tally once it includes `expected`, or as it stands after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._arrived:
                await self._arrived.wait_for(lambda: self.tally() >= expected)
        except TimeoutError:
            pass
        return self.tally()
