"""Registrars: the intake service (API and pages), offices, registrars and tokens,
offices' signing keys, the one accept path, and the outbox relay to Kafka."""
