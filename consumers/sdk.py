"""The agency SDK: everything an agency needs to join the bus.

``AgencyConsumer`` reads the agency's own topic (read_committed), decodes each
event, checks the registration office's signature over the fields delivered
(with the office's key from the key registry, so the broker need not be
trusted; see ``schemas.signatures``), de-duplicates by event id in the
agency's store, calls the agency's handler in the same database transaction as
the de-duplication record, emits a ``DeliveryReceipt`` to
``tuo.receipts.<agency>``, and commits the offset only after the receipt is
acknowledged by the broker. A message that does not decode or whose signature
does not hold goes to dead letters and is never handed to the handler.

A handler rejects an event by raising ``RejectEvent("why")``; the agency then
sends a ``REJECTED`` receipt carrying that reason.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumers.keys import KeyRing
from runtime import kafka
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import UndecodableMessage, decode, encode, models
from schemas.catalogue import DELIVERY_SUFFIX
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader, headers_for
from schemas.signatures import OfficeKey, SignatureRejected, key_id_of, read_signature, verify

log = structlog.get_logger(__name__)


class RejectEvent(Exception):
    """Raised by a handler: the agency will not apply this event, for this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DeliveredEvent:
    event_id: str
    event_type: str
    record: dict[str, Any]


Handler = Callable[[DeliveredEvent, asyncpg.Connection], Awaitable[None]]


@dataclass(frozen=True)
class Receipt:
    event_id: str
    outcome: str  # APPLIED or REJECTED
    reason: str | None


class HandlerFailed(Exception):
    """The agency's handler kept failing; the event is rejected and dead-lettered."""


HANDLER_ATTEMPTS = 3
HANDLER_BACKOFF_SECONDS = 0.5


async def handle_once(pool: asyncpg.Pool, agency: str, event: DeliveredEvent, handler: Handler) -> Receipt:
    """Apply the event at most once, even with two consumers racing during a
    rebalance: the inbox row is claimed first, in the handler's own transaction,
    so a second claimant waits on it and then finds the first receipt."""
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetchval(
            "INSERT INTO agency.inbox (agency, event_id, event_type, outcome)"
            " VALUES ($1, $2, $3, 'APPLIED') ON CONFLICT DO NOTHING RETURNING true",
            agency,
            event.event_id,
            event.event_type,
        )
        if not claimed:
            earlier = await conn.fetchrow(
                "SELECT outcome, reason FROM agency.inbox WHERE agency = $1 AND event_id = $2",
                agency,
                event.event_id,
            )
            return Receipt(event.event_id, earlier["outcome"], earlier["reason"])
        try:
            async with conn.transaction():  # a savepoint: a rejection undoes only the handler's work
                await handler(event, conn)
        except RejectEvent as rejection:
            await _record_rejection(conn, agency, event, rejection.reason)
            return Receipt(event.event_id, "REJECTED", rejection.reason)
        return Receipt(event.event_id, "APPLIED", None)


async def _record_rejection(
    conn: asyncpg.Connection, agency: str, event: DeliveredEvent, reason: str
) -> None:
    await conn.execute(
        "UPDATE agency.inbox SET outcome = 'REJECTED', reason = $3 WHERE agency = $1 AND event_id = $2",
        agency,
        event.event_id,
        reason,
    )


async def handle_with_retries(
    pool: asyncpg.Pool, agency: str, event: DeliveredEvent, handler: Handler
) -> Receipt:
    """Retry a failing handler with backoff; after the last attempt, reject the event
    with a reason naming the failure's type (its message may hold personal data)."""
    for attempt in range(1, HANDLER_ATTEMPTS + 1):
        try:
            return await handle_once(pool, agency, event, handler)
        except Exception as exc:
            log.warning(
                "handler_failed",
                agency=agency,
                event_id=event.event_id,
                attempt=attempt,
                error=type(exc).__name__,
            )
            if attempt == HANDLER_ATTEMPTS:
                reason = f"handler failed {attempt} times: {type(exc).__name__}"
                async with pool.acquire() as conn:
                    await conn.execute(
                        "INSERT INTO agency.inbox (agency, event_id, event_type, outcome, reason)"
                        " VALUES ($1, $2, $3, 'REJECTED', $4) ON CONFLICT DO NOTHING",
                        agency,
                        event.event_id,
                        event.event_type,
                        reason,
                    )
                raise HandlerFailed(reason) from exc
            await asyncio.sleep(HANDLER_BACKOFF_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class AgencyConsumer:
    """``keys`` gives the offices' public keys: by default read from ``pool``'s database
    (an agency running beside the bus); an agency elsewhere passes
    ``KeyRing.over_http(<intake public URL>)``."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        agency: str,
        handler: Handler,
        keys: KeyRing | None = None,
    ):
        self.settings = settings
        self.pool = pool
        self.agency = agency
        self.handler = handler
        self.topics = Topics(settings.topic_prefix)
        self.keys = keys or KeyRing.from_database(pool)

    def _event(self, record: ConsumerRecord[bytes, bytes], keys: Mapping[str, OfficeKey]) -> DeliveredEvent:
        cloud_event = CloudEvent.from_headers(record.headers)
        subject, body = decode(record.value or b"")
        if subject not in (cloud_event.type, f"{cloud_event.type}{DELIVERY_SUFFIX}"):
            raise UndecodableMessage(f"ce_type says {cloud_event.type} but the value is {subject}")
        envelope = body.get("envelope")
        if not isinstance(envelope, dict) or str(envelope.get("event_id")) != cloud_event.id:
            raise UndecodableMessage("ce_id does not match the envelope's event_id")
        try:
            event_id = str(uuid.UUID(cloud_event.id))
        except ValueError:
            raise UndecodableMessage("ce_id is not a UUID") from None
        signed = read_signature(record.headers)
        verify(
            signed,
            keys.get(signed.manifest.key_id),
            event_type=cloud_event.type,
            event_id=cloud_event.id,
            source=cloud_event.source,
            body=body,
        )
        return DeliveredEvent(event_id=event_id, event_type=cloud_event.type, record=body)

    def _receipt_value(self, receipt: Receipt) -> bytes:
        return encode(
            "DeliveryReceipt",
            models.DeliveryReceipt(
                event_id=receipt.event_id,
                agency=self.agency,
                outcome=receipt.outcome,
                reason=receipt.reason,
                issued_at=datetime.now(UTC),
            ).avro(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        group_id = f"{self.settings.topic_prefix}.agency.{self.agency}"
        consumer = kafka.consumer(
            self.settings,
            self.topics.agency(self.agency),
            group_id=group_id,
            client_id=f"tuo-agency-{self.agency}",
        )
        producer = kafka.producer(self.settings, client_id=f"tuo-agency-{self.agency}")
        try:
            await producer.start()
            await consumer.start()
            log.info("agency_consumer_started", agency=self.agency)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=200)
                for tp, records in batches.items():
                    await self._process(producer, tp, records)
                    await consumer.commit({tp: records[-1].offset + 1})
        finally:
            await consumer.stop()
            await producer.stop()

    async def _process(
        self,
        producer: kafka.AIOKafkaProducer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        pending: list[asyncio.Future[object]] = []

        async def to_dead_letters(record: ConsumerRecord[bytes, bytes], reason: str) -> None:
            letter = dead_letter(record, f"agency:{self.agency}", reason)
            pending.append(
                await producer.send(
                    self.topics.dead_letters, value=letter.value, key=letter.key, headers=letter.headers
                )
            )
            log.warning(
                "event_dead_lettered",
                agency=self.agency,
                partition=tp.partition,
                offset=record.offset,
                reason=reason,
            )

        # One key registry read at most per batch, and only for a key not seen before.
        keys = await self.keys.resolve(k for k in map(key_id_of, (r.headers for r in records)) if k)
        for record in records:
            try:
                event = self._event(record, keys)
            except (MissingCloudEventHeader, UndecodableMessage, SignatureRejected, ValueError) as exc:
                await to_dead_letters(record, str(exc))
                continue
            try:
                receipt = await handle_with_retries(self.pool, self.agency, event, self.handler)
            except HandlerFailed as failure:
                await to_dead_letters(record, str(failure))
                receipt = Receipt(event.event_id, "REJECTED", str(failure))
            value = self._receipt_value(receipt)
            pending.append(
                await producer.send(
                    self.topics.receipts(self.agency),
                    value=value,
                    key=record.key,
                    headers=headers_for(
                        value,
                        id=f"{event.event_id}/{self.agency}/{receipt.outcome}",
                        source=f"/agencies/{self.agency}",
                        subject=record.key.decode(errors="replace") if record.key else None,
                        time=datetime.now(UTC),
                        schema_base_url=self.settings.schema_base_url(),
                    ),
                )
            )
            log.info("event_handled", agency=self.agency, event_id=event.event_id, outcome=receipt.outcome)
        # Offsets are committed by the caller only after every receipt is durable.
        await asyncio.gather(*pending)
