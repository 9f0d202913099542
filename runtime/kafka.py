"""The one way to build a Kafka client, and the topic names.

Every client gets its connection and security settings from ``Settings``;
components ask for a producer or consumer here and never construct aiokafka
classes themselves.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition

from runtime.settings import Settings

__all__ = [
    "AIOKafkaConsumer",
    "AIOKafkaProducer",
    "NoCredentials",
    "Topics",
    "admin",
    "connection_options",
    "consumer",
    "ensure_topics",
    "offsets_after_writes",
    "producer",
    "send_many",
]

MiB = 1024 * 1024
# Who a client works for decides how it batches, here and nowhere else. Components that
# move batches (router, replay, an agency's receipts) write producer batches of up to
# a MiB (the broker's default message.max.bytes) instead of aiokafka's 16 KiB; a poll
# fetches up to 4 MiB per partition. linger_ms stays a few ms: each batch of work ends
# by waiting for its acknowledgements, so a longer linger only adds latency. The relay
# and the router linger not at all: a transaction queues all its writes, then waits for
# them to be acknowledged before its offsets (``offsets_after_writes``), so a linger
# is only a wait.
Role = Literal["relay", "router", "replay", "agency", "tracker", "tool"]
_PRODUCER_TUNING: dict[str, dict[str, Any]] = {
    "relay": {"linger_ms": 0},
    "router": {"linger_ms": 0, "max_batch_size": MiB},
    "replay": {"linger_ms": 20, "max_batch_size": MiB},
    "agency": {"linger_ms": 2, "max_batch_size": MiB},
    "tracker": {"linger_ms": 5},
    "tool": {"linger_ms": 5},
}
# The router's fetches wait 50 ms for new events, not aiokafka's 500: with 500, an event
# the relay had committed sometimes waited out most of it (as if the broker did not
# answer the router's read_committed fetch when the relay's transaction committed; not
# seen at the agencies, whose fetches 50 ms did not speed up), and relay → router took
# p99 ~360 ms at 100 events/s, against ~130 ms with 50 (bench.agencies --only latency).
_CONSUMER_TUNING: dict[str, dict[str, Any]] = {
    "router": {"max_partition_fetch_bytes": 4 * MiB, "fetch_max_wait_ms": 50},
    "agency": {"max_partition_fetch_bytes": 4 * MiB},
    "tracker": {"max_partition_fetch_bytes": 4 * MiB},
}


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
    def consent_changes(self) -> str:
        """Signed ConsentChanged messages from the consent pages (relayed from the outbox,
        read by the router, which passes each on to the agencies that hold data under it)."""
        return f"{self.prefix}.consent-changes"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead-letters"

    @property
    def relay_ledger(self) -> str:
        """Never written: the relay commits its ledger offset here, so it needs no
        access to the life-events topic beyond writing."""
        return f"{self.prefix}.relay-ledger"

    def agency(self, agency: str) -> str:
        return f"{self.prefix}.agency.{agency}"

    def agency_dead_letters(self, agency: str) -> str:
        """Events an agency's consumer could not handle: its own topic, so that no agency
        writes where another component's (or another agency's) dead letters are."""
        return f"{self.prefix}.dead-letters.agency.{agency}"

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


class NoCredentials(RuntimeError):
    """SASL is configured but nothing says which password a principal uses."""

    def __init__(self, principal: str) -> None:
        super().__init__(
            f"no Kafka credentials for {principal!r}: set TUO_KAFKA_SASL_USERNAME and "
            "TUO_KAFKA_SASL_PASSWORD, or name it in TUO_KAFKA_CREDENTIALS_FILE"
        )


def connection_options(
    settings: Settings, principal: str, credentials: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Bootstrap servers, TLS and SASL for a client acting as ``principal`` (with the
    given user name and password, or else those the settings name for it)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.require_bootstrap_servers(),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        # Verifies the broker's certificate and host name against this CA only.
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol.startswith("SASL_"):
        credentials = credentials or settings.kafka_credentials(principal)
        if credentials is None:
            raise NoCredentials(principal)
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "SCRAM-SHA-512"
        options["sasl_plain_username"], options["sasl_plain_password"] = credentials
    return options


def producer(
    settings: Settings,
    *,
    principal: str,
    client_id: str,
    role: Role = "tool",
    transactional_id: str | None = None,
    **extra: Any,
) -> AIOKafkaProducer:
    """An idempotent producer (acks=all), batching as its ``role`` should; transactional
    when given an id."""
    options: dict[str, Any] = {**_PRODUCER_TUNING[role], **extra}
    return AIOKafkaProducer(
        **connection_options(settings, principal),
        client_id=client_id,
        enable_idempotence=True,
        transactional_id=transactional_id,
        **options,
    )


def consumer(
    settings: Settings,
    *topics: str,
    principal: str,
    group_id: str | None,
    client_id: str,
    role: Role = "tool",
    **extra: Any,
) -> AIOKafkaConsumer:
    """A read_committed consumer that never auto-commits: callers commit after their work."""
    options: dict[str, Any] = {**_CONSUMER_TUNING.get(role, {}), **extra}
    return AIOKafkaConsumer(
        *topics,
        **connection_options(settings, principal),
        group_id=group_id,
        client_id=client_id,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )


Message = tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]  # key, value, headers
_MASK = 0xFFFFFFFF
_M = 0x5BD1E995  # murmur2's mixing constant
_WORDS: dict[int, struct.Struct] = {}  # a key's length in 4-byte words → their little-endian reader


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a key (``Utils.murmur2`` in the Java client), the same
    number as aiokafka's ``partitioner.murmur2`` but a word at a time rather than a byte
    at a time: about a quarter of the Python steps, for a hash made for every message."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length >> 2
    words = _WORDS.get(whole)
    if words is None:
        words = struct.Struct(f"<{whole}I")
        if whole < 256:  # keys are short (a subject id is 34 bytes): keep a reader for each length
            _WORDS[whole] = words
    for k in words.unpack_from(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest:
        tail = length - rest
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``partitions`` that Kafka's default partitioner gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def send_many(
    producer: AIOKafkaProducer, topic: str, messages: Sequence[Message], *, partitions: int | None = None
) -> list[asyncio.Future[Any]]:
    """Queue ``messages`` for ``topic`` as whole record batches, partitioned by key as
    ``send`` would (murmur2, computed once per distinct key, none for a one-partition
    topic) and in order within each partition. ``partitions``: how many to spread over
    (default: as many as the topic has now). Returns one future per batch, done when
    the broker has acknowledged it. Much cheaper per message than ``send``."""
    spread = sorted(await producer.partitions_for(topic)) if partitions is None else list(range(partitions))
    by_partition: dict[int, list[Message]] = {}
    hashed: dict[bytes, int] = {}
    for message in messages:
        key = message[0]
        if len(spread) == 1 or key is None:
            partition = spread[0]
        elif key in hashed:
            partition = hashed[key]
        else:
            partition = hashed[key] = spread[partition_of(key, len(spread))]
        by_partition.setdefault(partition, []).append(message)
    sent: list[asyncio.Future[Any]] = []
    for partition, queued in by_partition.items():
        batch = producer.create_batch()
        for key, value, headers in queued:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                sent.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a message for {topic} is larger than a whole producer batch")
        if batch.record_count():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
    return sent


async def offsets_after_writes(
    producer: AIOKafkaProducer,
    writes: Sequence[asyncio.Future[Any]],
    offsets: dict[TopicPartition, Any],
    group_id: str,
) -> None:
    """Add consumer ``offsets`` (the relay's ledger, the router's input) to the open
    transaction once its ``writes`` are acknowledged, not while they are in flight.

    The broker checks the first write to each partition of a transaction with the
    transaction coordinator, and while the coordinator is busy adding the offsets to the
    same transaction it answers CONCURRENT_TRANSACTIONS, which it reports to clients of
    aiokafka's protocol version as NOT_ENOUGH_REPLICAS (KIP-890); aiokafka then retries
    the write after retry_backoff_ms (100 ms). At 100 events/s about 8 writes a second
    waited those 100 ms; waiting for the acknowledgements costs one round trip instead."""
    await asyncio.gather(*writes)
    await producer.send_offsets_to_transaction(offsets, group_id)


def admin(settings: Settings, *, principal: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection_options(settings, principal), client_id=f"tuo-admin-{principal}")


async def ensure_topics(
    settings: Settings,
    agencies: Iterable[str],
    *,
    principal: str,
    bus: bool = True,
    receipts: bool = True,
) -> list[str]:
    """Create the bus's topics that do not exist yet; return those created.

    ``bus`` covers the shared topics, ``receipts`` the agencies' receipt topics; the
    router, which may create only agencies' topics, asks for neither.
    """
    topics = Topics(settings.topic_prefix)
    wanted: dict[str, int] = {}
    if bus:
        wanted = {
            topics.life_events: settings.life_events_partitions,
            topics.routing_decisions: settings.life_events_partitions,
            topics.redeliveries: settings.life_events_partitions,
            topics.consent_changes: settings.life_events_partitions,
            topics.dead_letters: 1,
            topics.relay_ledger: 1,
        }
    for agency in agencies:
        wanted[topics.agency(agency)] = settings.agency_partitions
        if receipts:
            wanted[topics.receipts(agency)] = 1
            wanted[topics.agency_dead_letters(agency)] = 1
    client = admin(settings, principal=principal)
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
