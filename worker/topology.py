"""The broker objects the worker declares: the contract's exchanges and its own command queues.

Two quorum queues split the commands by cost, so a backlog of argon2 work (sign-ups, sign-ins)
never delays the cheap commands (`session.verify`). Both are bound to `identity.commands` with
the names of their commands as routing keys; `queue_for()` is the single source of that split.

What the worker can rely on from a RabbitMQ 3.10 quorum queue with `x-delivery-limit`:

- The queue counts *returns* of a message: a nack/reject with requeue, or the channel or
  connection closing while the message is unacked. Acked messages are never counted.
- The count reaches the consumer in the `x-delivery-count` message header (an integer). On
  3.10 the header is already there, as 0, on the first delivery (checked against 3.10.8; 3.12
  stopped adding it there, rabbitmq-server#7732), and it is absent on messages that never went
  through a quorum queue. So read it as "earlier failed deliveries", treat a missing or odd
  header as 0, and never take its presence as a sign of redelivery.
- Once the count exceeds `x-delivery-limit` the queue dead-letters the message (reason
  `delivery_limit`) to `x-dead-letter-exchange` with its *raw* body: with limit N a message is
  delivered at most N + 1 times, carrying counts 0..N, and the return of the last one sends it
  away. The worker's own limit (`worker_delivery_limit`, validated below the queue's)
  dead-letters a redacted copy and acks when it sees a count at that limit, which always comes
  first, so the backstop only fires if the worker dies on every attempt.
- A publisher can set `x-delivery-count` itself. 3.10 overwrites it on delivery, but the
  stored message keeps the publisher's value (it reappears on dead letters) and later
  versions stop adding the header on first deliveries: the count is believed only on a
  redelivery (`redelivered` set by the broker), see `delivery_count()`.
- `x-dead-letter-strategy: at-least-once` makes the queue keep a message until the dead-letter
  target confirms it, instead of dropping it if the route fails; RabbitMQ only honours it
  together with `x-overflow: reject-publish` (otherwise it silently falls back to
  at-most-once).
- Whatever the broker dead-letters itself (the delivery limit, a message's `expiration`, a
  reject) carries the raw body, passwords included. It goes to an internal exchange that no
  client may publish to, whose queue only the worker's user reads: the worker redacts it on
  the way to `identity.dead` (worker.forwarder).

Queue arguments are fixed at declaration: re-declaring with different ones fails with
PRECONDITION_FAILED, so changing them means a new queue name or a policy, not an edit here.
That is why the queues are `identity.worker.v2.*`: the v1 queues dead-lettered raw bodies
straight into `identity.dead`; a worker retires them at start (worker.upgrade).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from messages.commands import COMMANDS
from messages.topology import (
    COMMANDS_EXCHANGE,
    COMMANDS_EXCHANGE_ARGUMENTS,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    UNROUTED_EXCHANGE,
)

PASSWORD_QUEUE = "identity.worker.v2.password"  # noqa: S105 - a queue name, not a secret
FAST_QUEUE = "identity.worker.v2.fast"
# The v1 queues, and the v2 queue that takes over each one's commands.
V1_QUEUES = {
    "identity.worker.password": PASSWORD_QUEUE,
    "identity.worker.fast": FAST_QUEUE,
}
# Where the broker dead-letters the worker's queues (and the courier's): internal, so only
# the broker's own dead-lettering feeds it, and read by the worker's user alone.
BROKER_DEAD_EXCHANGE = "identity.worker.dlx"
BROKER_DEAD_QUEUE = "identity.worker.dlq"
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass(frozen=True, slots=True)
class Topology:
    """The declared objects, for the consumers, the reply writer and the outbox relay."""

    commands_exchange: AbstractExchange
    events_exchange: AbstractExchange
    dead_exchange: AbstractExchange
    dead_queue: AbstractQueue
    password_queue: AbstractQueue
    fast_queue: AbstractQueue
    broker_dead_queue: AbstractQueue


def queue_for(command: str) -> str:
    """The worker queue that carries `command` (a name from COMMANDS; KeyError otherwise)."""
    return PASSWORD_QUEUE if COMMANDS[command].password_work else FAST_QUEUE


def routing_keys(queue: str) -> list[str]:
    """The command names bound to `queue`, in table order."""
    return [name for name in COMMANDS if queue_for(name) == queue]


def delivery_count(headers: Mapping[str, Any] | None, *, redelivered: bool) -> int:
    """Earlier failed deliveries of a message, from its `x-delivery-count` header: 0 on a
    first delivery (`redelivered` false), whatever a publisher wrote there, and 0 if none."""
    if not redelivered:
        return 0
    value = (headers or {}).get(DELIVERY_COUNT_HEADER)
    # bool is an int subclass; a publisher-set True must not count as one failure.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def worker_queue_arguments(delivery_limit: int) -> FieldTable:
    """The arguments of both worker queues (see the module docstring for why each). No
    `x-quorum-initial-group-size`: RabbitMQ then gives the queue a replica on every member
    of the cluster, three of three in tests/faults/test_clusters.py (docs/clusters.md)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": BROKER_DEAD_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(channel: AbstractChannel, *, delivery_limit: int) -> Topology:
    """Declare (idempotently) everything the worker needs and bind the command queues."""
    unrouted = await channel.declare_exchange(
        UNROUTED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    commands = await channel.declare_exchange(
        COMMANDS_EXCHANGE,
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments=dict(COMMANDS_EXCHANGE_ARGUMENTS),
    )
    events = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_exchange(DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    # Quorum too, so a cluster keeps the copies operators need to look at.
    dead_queue = await channel.declare_queue(
        DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead, routing_key="")
    broker_dead = await channel.declare_exchange(
        BROKER_DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True, internal=True
    )
    # A backstop of its own against a forwarder that dies on every try (worker.forwarder
    # gives up first); no dead-letter exchange: nothing raw leaves it.
    broker_dead_queue = await channel.declare_queue(
        BROKER_DEAD_QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": delivery_limit},
    )
    await broker_dead_queue.bind(broker_dead, routing_key="")
    queues = {}
    for name in (PASSWORD_QUEUE, FAST_QUEUE):
        queue = await channel.declare_queue(
            name, durable=True, arguments=worker_queue_arguments(delivery_limit)
        )
        for command in routing_keys(name):
            await queue.bind(commands, routing_key=command)
        queues[name] = queue
    # An unknown command is cheap to refuse: the fast queue answers it `unknown_command`.
    await queues[FAST_QUEUE].bind(unrouted, routing_key="")
    return Topology(
        commands_exchange=commands,
        events_exchange=events,
        dead_exchange=dead,
        dead_queue=dead_queue,
        password_queue=queues[PASSWORD_QUEUE],
        fast_queue=queues[FAST_QUEUE],
        broker_dead_queue=broker_dead_queue,
    )
