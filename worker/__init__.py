"""The AMQP edge of the identity worker."""
