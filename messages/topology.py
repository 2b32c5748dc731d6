"""Broker names pinned by contract v1. The worker's own queues are the worker's business."""

# Every exchange and queue of the identity service is named under this prefix (and the
# worker's broker user has permissions on it alone).
IDENTITY_PREFIX = "identity."
COMMANDS_EXCHANGE = "identity.commands"  # direct; routing key = command name
# Commands nobody is bound for go to this fanout (the commands exchange's alternate exchange),
# whose only queue is a worker's: the caller gets `unknown_command` instead of silence.
UNROUTED_EXCHANGE = "identity.unrouted"
# Everyone who declares the commands exchange must declare it with these arguments.
COMMANDS_EXCHANGE_ARGUMENTS = {"alternate-exchange": UNROUTED_EXCHANGE}
EVENTS_EXCHANGE = "identity.events"  # topic; routing key = event type
DEAD_EXCHANGE = "identity.dead"  # fanout; redacted copies of what could not be processed
DEAD_QUEUE = "identity.dead"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONTENT_TYPE = "application/json"
# Contract v2: one-time codes and notices for the mail sender. The worker declares and writes
# both; the mail sender only reads the queue (its broker user has no write permission at all).
COURIER_EXCHANGE = "identity.courier"  # direct, durable; routing key = the message's kind
COURIER_QUEUE = "identity.courier"  # quorum; dead-letters to the worker's internal exchange
