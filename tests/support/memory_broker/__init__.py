"""An in-memory AMQP broker for tests: RabbitMQ's routing, acknowledgements and publisher
confirms, in process.

`MemoryBroker().connect()` stands in for `aio_pika.connect_robust()`. The worker runs on it
unchanged: deliveries are real `aio_pika.IncomingMessage`s, and a channel's underlay takes
aiormq's calls (`basic_publish`, `basic_ack`, `basic_nack`) and answers with aiormq's frames
and exceptions. The contract tests (tests/contract/test_broker_semantics.py and
test_pipeline.py) run each case on this double and on RabbitMQ, which keeps it honest.

What it models:

- exchanges `direct`, `topic` (`*` one word, `#` any number) and `fanout`, the default
  exchange (routing key = queue name), and an `alternate-exchange` for what no binding routes;
- queues: durable, exclusive (to their connection, deleted with it), auto-delete (with their
  last consumer), server-named; bindings; a re-declaration with other properties or arguments
  closes the channel (PRECONDITION_FAILED), a passive one of a missing object too (NOT_FOUND);
- consumers served round robin, each delivery in a task of its own that closing the channel
  cancels; `basic.qos` prefetch per consumer; `basic.get`;
- acks: `basic.ack` (`multiple`), `basic.nack` / `basic.reject` with or without requeue; a tag
  the channel does not hold closes it (PRECONDITION_FAILED); what a closed channel held goes
  back to the front of its queue, marked `redelivered`;
- quorum queues (`x-queue-type: quorum`): returns counted in `x-delivery-count` (absent on a
  first delivery, as on RabbitMQ 3.12+); past `x-delivery-limit` the message is dead-lettered;
- dead-lettering to `x-dead-letter-exchange` (rejected, delivery limit, overflow), `x-death`;
- `x-max-length` with `x-overflow` `drop-head` (the default) or `reject-publish`;
- publishing: publisher confirms (an ack, or a nack raising `DeliveryError` when a queue
  refused the message), mandatory returns (`PublishError`, or the return callbacks), and
  `reply_to` through a named queue or direct reply-to (`amq.rabbitmq.reply-to`).

Not modelled: connection recovery (a closed connection stays closed), transactions, headers
exchanges, exchange-to-exchange bindings, TTLs, priorities, consumer-cancel notifications.

Inside: `model` (exchanges, queues, consumers, messages), `broker` (declarations, routing,
dead-lettering, dispatch), `channel` (a channel as aiormq shows it: tags, acks, confirms) and
`client` (the aio-pika side: connection, channels, exchanges, queues).
"""

from tests.support.memory_broker.broker import MemoryBroker
from tests.support.memory_broker.client import (
    MemoryChannel,
    MemoryConnection,
    MemoryExchange,
    MemoryQueue,
)

__all__ = ["MemoryBroker", "MemoryChannel", "MemoryConnection", "MemoryExchange", "MemoryQueue"]
