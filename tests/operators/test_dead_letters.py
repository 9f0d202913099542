"""Kafka messages that cannot be processed are kept, with the reason, on the
dead-letter topic, and the component keeps going. Nothing is silently dropped."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from aiokafka.structs import ConsumerRecord

from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import encode
from schemas.cloudevents import CloudEvent
from tests.support import death_registration, eventually, header, inspector_producer, read_topic

pytestmark = pytest.mark.integration


def encode_death() -> bytes:
    from tests.golden.make_vectors import EXAMPLES

    return encode("DeathRegistered", EXAMPLES["DeathRegistered"])


async def _produce(settings: Settings, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> str:
    marker = uuid.uuid4().hex
    producer = inspector_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=marker.encode(), headers=headers)
    finally:
        await producer.stop()
    return marker


async def _dead_letter(
    settings: Settings, marker: str, topic: str | None = None
) -> ConsumerRecord[bytes, bytes]:
    """The dead letter carrying ``marker``, on the shared topic unless another is named."""
    topic = topic or Topics(settings.topic_prefix).dead_letters

    async def found() -> ConsumerRecord[bytes, bytes] | None:
        for record in await read_topic(settings, topic):
            if record.key == marker.encode():
                return record
        return None

    return await eventually(found, timeout=30, what=f"dead letter {marker}")


UNROUTABLE = [
    ("no CloudEvents headers", b"\x00\x00\x00\x00\x02garbage", [], "no ce_id, ce_type, ce_source"),
    (
        "JSON instead of Avro",
        b'{"deceased": "x"}',
        CloudEvent(id="x", type="DeathRegistered", source="/evil").headers(),
        "magic byte is 123",
    ),
    (
        "garbage bytes",
        bytes(range(256)) * 4,
        CloudEvent(id="g", type="DeathRegistered", source="/evil").headers(),
        "no schema with id 16909060",
    ),
    (
        "wrong magic byte",
        b"\x07" + encode_death()[1:],
        CloudEvent(id="m", type="DeathRegistered", source="/evil").headers(),
        "magic byte is 7, expected 0",
    ),
    (
        "unknown schema id",
        b"\x00\x00\x00\x30\x39" + encode_death()[5:],
        CloudEvent(id="u", type="DeathRegistered", source="/evil").headers(),
        "no schema with id 12345",
    ),
    (
        "truncated payload",
        encode_death()[:60],
        CloudEvent(id="t", type="DeathRegistered", source="/evil").headers(),
        "DeathRegistered body does not decode",
    ),
    (
        "a receipt posing as a life event",
        encode(
            "DeliveryReceipt",
            {
                "event_id": str(uuid.uuid4()),
                "agency": "dwp",
                "outcome": "APPLIED",
                "issued_at": datetime.now(UTC),
            },
        ),
        CloudEvent(id="y", type="DeliveryReceipt", source="/evil").headers(),
        "not a life event",
    ),
]


@pytest.mark.parametrize(
    ("case", "value", "headers", "reason"), UNROUTABLE, ids=[case[0] for case in UNROUTABLE]
)
async def test_router_dead_letters_what_it_cannot_route_and_keeps_routing(
    services: Settings,
    intake: httpx.AsyncClient,
    case: str,
    value: bytes,
    headers: list[tuple[str, bytes]],
    reason: str,
) -> None:
    topics = Topics(services.topic_prefix)
    marker = await _produce(services, topics.life_events, value, headers)
    letter = await _dead_letter(services, marker)
    assert letter.value == value, "the original bytes are kept"
    assert reason in (header(letter, "tuo_dlq_reason") or ""), case
    assert header(letter, "tuo_dlq_component") == "router"
    assert header(letter, "tuo_dlq_topic") == topics.life_events

    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()

    async def routed() -> bool:
        status = (await intake.get(f"/v1/events/{accepted['reference']}")).json()
        return bool(status["agencies"])

    await eventually(routed, what="the next valid event to be routed")


async def test_agency_consumer_dead_letters_a_message_it_cannot_decode(services: Settings) -> None:
    topics = Topics(services.topic_prefix)
    marker = await _produce(
        services,
        topics.agency("hmpo"),
        b"\x00\x00\x00\x00\x02\xff\xff\xff",
        CloudEvent(id=str(uuid.uuid4()), type="DeathRegistered", source="/evil").headers(),
    )
    letter = await _dead_letter(services, marker, topics.agency_dead_letters("hmpo"))
    assert header(letter, "tuo_dlq_component") == "agency:hmpo"
    assert "does not decode" in (header(letter, "tuo_dlq_reason") or "")


async def test_receipt_naming_another_agency_is_not_trusted(services: Settings, pool: asyncpg.Pool) -> None:
    topics = Topics(services.topic_prefix)
    event_id = str(uuid.uuid4())
    forged = encode(
        "DeliveryReceipt",
        {"event_id": event_id, "agency": "hmrc", "outcome": "APPLIED", "issued_at": datetime.now(UTC)},
    )
    marker = await _produce(
        services,
        topics.receipts("dvla"),
        forged,
        CloudEvent(id=event_id, type="DeliveryReceipt", source="/agencies/dvla").headers(),
    )
    letter = await _dead_letter(services, marker)
    assert "names agency 'hmrc' but came from 'dvla'" in (header(letter, "tuo_dlq_reason") or "")
    assert (
        await pool.fetchval("SELECT count(*) FROM delivery_receipt WHERE event_id = $1", uuid.UUID(event_id))
        == 0
    )
