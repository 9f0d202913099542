"""The one way to build a Kafka client, and the topic names.

Every client gets its connection and security settings from ``Settings``;
components ask for a producer or consumer here and never construct aiokafka
classes themselves.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runtime.settings import Settings

__all__ = [
    "AIOKafkaConsumer",
    "AIOKafkaProducer",
    "Topics",
    "admin",
    "consumer",
    "ensure_topics",
    "producer",
]


class Topics:
    """Topic names, all under the configured prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def life_events(self) -> str:
        return f"{self.prefix}.life-events"

    @property
    def routing_decisions(self) -> str:
        return f"{self.prefix}.routing-decisions"

    @property
    def redeliveries(self) -> str:
        """Life events an operator asked to send again to one agency (read by the router)."""
        return f"{self.prefix}.redeliveries"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    def agency(self, agency: str) -> str:
        return f"{self.prefix}.agency.{agency}"

    def receipts(self, agency: str) -> str:
        return f"{self.prefix}.receipts.{agency}"

    def receipts_pattern(self) -> str:
        return "^" + re.escape(self.prefix) + r"\.receipts\.[a-z][a-z0-9-]*$"

    def agency_from_receipts_topic(self, topic: str) -> str:
        return topic.removeprefix(f"{self.prefix}.receipts.")


class TopicCreationFailed(RuntimeError):
    """The broker refused to create some of the bus's topics."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(
            "Kafka refused to create topics (check replication factor against the number of brokers, "
            "and the ACLs): " + "; ".join(failures)
        )


def _connection(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_bootstrap_servers(),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def producer(settings: Settings, *, client_id: str, transactional_id: str | None = None) -> AIOKafkaProducer:
    """An idempotent producer (acks=all); transactional when given an id."""
    return AIOKafkaProducer(
        **_connection(settings),
        client_id=client_id,
        enable_idempotence=True,
        transactional_id=transactional_id,
        linger_ms=5,
    )


def consumer(
    settings: Settings, *topics: str, group_id: str, client_id: str, **extra: Any
) -> AIOKafkaConsumer:
    """A read_committed consumer that never auto-commits: callers commit after their work."""
    return AIOKafkaConsumer(
        *topics,
        **_connection(settings),
        group_id=group_id,
        client_id=client_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **extra,
    )


def admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_connection(settings), client_id="tuo-admin")


async def ensure_topics(settings: Settings, agencies: Iterable[str]) -> list[str]:
    """Create the bus's topics that do not exist yet; return those created."""
    topics = Topics(settings.topic_prefix)
    wanted = {
        topics.life_events: settings.life_events_partitions,
        topics.routing_decisions: settings.life_events_partitions,
        topics.redeliveries: settings.life_events_partitions,
        topics.dead_letters: 1,
    }
    for agency in agencies:
        wanted[topics.agency(agency)] = 1
        wanted[topics.receipts(agency)] = 1
    client = admin(settings)
    await client.start()
    try:
        existing = set(await client.list_topics())
        missing = [
            NewTopic(name, partitions, settings.topic_replication_factor)
            for name, partitions in sorted(wanted.items())
            if name not in existing
        ]
        if missing:
            response = await client.create_topics(missing)
            failures = [
                f"{entry[0]}: error {entry[1]} {entry[2] if len(entry) > 2 else ''}".strip()
                for entry in response.topic_errors
                if entry[1] not in (0, TopicAlreadyExistsError.errno)
            ]
            if failures:
                raise TopicCreationFailed(failures)
        return [t.name for t in missing]
    finally:
        await client.close()
