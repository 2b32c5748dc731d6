"""Broker names pinned by contract v1. The worker's own queues are the worker's business."""

COMMANDS_EXCHANGE = "identity.commands"  # direct; routing key = command name
EVENTS_EXCHANGE = "identity.events"  # topic; routing key = event type
DEAD_EXCHANGE = "identity.dead"  # fanout; redacted copies of what could not be processed
DEAD_QUEUE = "identity.dead"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONTENT_TYPE = "application/json"
