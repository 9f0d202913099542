"""The receipt tracker: store every routing decision and delivery receipt in
PostgreSQL, where the status lookup reads them.

A receipt is accepted only from the agency whose receipt topic it arrived on.
"""

from __future__ import annotations

import asyncio
import re

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord

from router import audit
from runtime import kafka
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import UndecodableMessage, decode

log = structlog.get_logger(__name__)
COMPONENT = "receipt-tracker"


class UntrustedReceipt(ValueError):
    """A receipt whose content does not match the topic it came from."""


async def _store(conn: asyncpg.Connection, topics: Topics, record: ConsumerRecord[bytes, bytes]) -> None:
    subject, body = decode(record.value or b"")
    if record.topic == topics.routing_decisions:
        if subject != "RoutingDecision":
            raise UntrustedReceipt(f"{subject} on the routing decisions topic")
        await audit.append(conn, audit.Decision.of(body))
        return
    agency = topics.agency_from_receipts_topic(record.topic)
    if subject != "DeliveryReceipt":
        raise UntrustedReceipt(f"{subject} on {record.topic}")
    if body["agency"] != agency:
        raise UntrustedReceipt(f"receipt names agency {body['agency']!r} but came from {agency!r}")
    await conn.execute(
        "INSERT INTO delivery_receipt (event_id, agency, outcome, reason, issued_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        body["event_id"],
        agency,
        body["outcome"],
        body["reason"],
        body["issued_at"],
    )


async def run_tracker(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    topics = Topics(settings.topic_prefix)
    group_id = f"{settings.topic_prefix}.receipt-tracker"
    pattern = f"(?:{topics.receipts_pattern()})|^{re.escape(topics.routing_decisions)}$"
    consumer = kafka.consumer(
        settings, group_id=group_id, client_id="tuo-receipt-tracker", metadata_max_age_ms=5000
    )
    consumer.subscribe(pattern=pattern)
    dead_letters = kafka.producer(settings, client_id="tuo-receipt-tracker")
    try:
        await dead_letters.start()
        async with pool.acquire() as conn:
            sealed = await audit.seal_unsealed(conn)
        if sealed:
            log.info("decision_chain_sealed", rows=sealed)
        await consumer.start()
        log.info("receipt_tracker_started", group_id=group_id)
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, records in batches.items():
                async with pool.acquire() as conn, conn.transaction():
                    for record in records:
                        try:
                            await _store(conn, topics, record)
                        except (UndecodableMessage, UntrustedReceipt, KeyError) as exc:
                            letter = dead_letter(record, COMPONENT, str(exc))
                            await dead_letters.send_and_wait(
                                topics.dead_letters,
                                value=letter.value,
                                key=letter.key,
                                headers=letter.headers,
                            )
                            log.warning(
                                "receipt_dead_lettered",
                                topic=record.topic,
                                offset=record.offset,
                                reason=str(exc),
                            )
                await consumer.commit({tp: records[-1].offset + 1})
    finally:
        await consumer.stop()
        await dead_letters.stop()
