"""Producers: the registrar intake service (HTTP) and the outbox relay to Kafka."""
