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
sends a ``REJECTED`` receipt carrying that reason. A handler that is still
working after ``received_after`` seconds gets a ``RECEIVED`` receipt sent for it
meanwhile, and the consumer keeps polling (with its partitions paused) so a
slow handler never costs it its place in the consumer group.

A ``ConsentChanged`` message (the person's consent for this agency to be told of
one event type has stopped; see ``router.consent_changes``) is handed to the same
handler, as a ``DeliveredEvent`` of type ``ConsentChanged`` whose ``event_id`` is
the change id and whose record is the change. It must be signed by the consent
service (``schemas.consent_signatures``, keys from ``consent_keys``) and be about
this agency; anything else goes to dead letters and is never handed over. It is
de-duplicated and receipted like an event.

Every receipt says when the event was received; one for a delivery the agency
had already handled (a redelivery or replay) repeats the first outcome and is
marked ``duplicate``: nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import Counter

from runtime import kafka
from runtime.access import agency_principal
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.keyring import KeyRing
from runtime.metrics import DEAD_LETTERS, LAG, RECEIPTS_SENT
from runtime.settings import Settings
from schemas import UndecodableMessage, decode, encode, models
from schemas.catalogue import DELIVERY_SUFFIX, DISCLOSURE_SUFFIX, NAMESPACE
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader, headers_for
from schemas.consent_signatures import CONSENT_CHANGED, verify_consent_change
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
    outcome: str  # RECEIVED, APPLIED or REJECTED
    reason: str | None
    duplicate: bool = False  # the agency had handled and receipted this event before


class NotForThisAgency(ValueError):
    """A consent change about another agency arrived on this agency's topic."""


def subject_of(event: DeliveredEvent) -> str | None:
    """The pseudonymous subject an event or consent change is about, if it says."""
    if event.event_type == CONSENT_CHANGED:
        found = event.record.get("subject_id")
    else:
        envelope = event.record.get("envelope")
        subject = envelope.get("subject") if isinstance(envelope, dict) else None
        found = subject.get("subject_id") if isinstance(subject, dict) else None
    return found if isinstance(found, str) else None


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
            "INSERT INTO agency.inbox (agency, event_id, event_type, outcome, subject_id)"
            " VALUES ($1, $2, $3, 'APPLIED', $4) ON CONFLICT DO NOTHING RETURNING true",
            agency,
            event.event_id,
            event.event_type,
            subject_of(event),
        )
        if not claimed:
            earlier = await conn.fetchrow(
                "SELECT outcome, reason, receipted_at FROM agency.inbox WHERE agency = $1 AND event_id = $2",
                agency,
                event.event_id,
            )
            # Never receipted (the consumer stopped between applying and receipting):
            # this is the first receipt, not a duplicate.
            duplicate = earlier["receipted_at"] is not None
            return Receipt(event.event_id, earlier["outcome"], earlier["reason"], duplicate)
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


RECEIVED_AFTER_SECONDS = 2.0  # a handler still busy then gets a RECEIVED receipt meanwhile
KEEPALIVE_POLL_MS = 500  # how often a consumer waiting on a slow batch polls its group


async def mark_receipted(pool: asyncpg.Pool, agency: str, event_ids: list[str]) -> None:
    """Remember that these events' receipts reached the broker (see ``handle_once``)."""
    await pool.execute(
        "UPDATE agency.inbox SET receipted_at = now()"
        " WHERE agency = $1 AND event_id = ANY($2::uuid[]) AND receipted_at IS NULL",
        agency,
        event_ids,
    )


async def _cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class AgencyConsumer:
    """``keys`` gives the offices' public keys: by default read from ``pool``'s database
    (an agency running beside the bus); an agency elsewhere passes
    ``KeyRing.over_http(<intake public URL>)``. ``consent_keys`` likewise gives the
    consent service's keys (``KeyRing.consent_over_http(<citizens' public URL>)``)."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        agency: str,
        handler: Handler,
        keys: KeyRing | None = None,
        *,
        consent_keys: KeyRing | None = None,
        received_after: float = RECEIVED_AFTER_SECONDS,
        **consumer_options: Any,
    ):
        self.settings = settings
        self.pool = pool
        self.agency = agency
        self.handler = handler
        self.topics = Topics(settings.topic_prefix)
        self.keys = keys or KeyRing.from_database(pool)
        self.consent_keys = consent_keys or KeyRing.consent_from_database(pool)
        self.received_after = received_after
        self.consumer_options = consumer_options

    def _consent_change(
        self, record: ConsumerRecord[bytes, bytes], cloud_event: CloudEvent, keys: Mapping[str, OfficeKey]
    ) -> DeliveredEvent:
        subject, body = decode(record.value or b"")
        if subject != CONSENT_CHANGED:
            raise UndecodableMessage(f"ce_type says {CONSENT_CHANGED} but the value is {subject}")
        try:
            change_id = str(uuid.UUID(cloud_event.id))
        except ValueError:
            raise UndecodableMessage("ce_id is not a UUID") from None
        signed = read_signature(record.headers)
        verify_consent_change(
            signed,
            keys.get(signed.manifest.key_id),
            event_id=cloud_event.id,
            source=cloud_event.source,
            body=body,
        )
        if body.get("agency") != self.agency:
            raise NotForThisAgency(f"a consent change for {body.get('agency')!r} reached {self.agency!r}")
        return DeliveredEvent(event_id=change_id, event_type=CONSENT_CHANGED, record=body)

    def _event(
        self,
        record: ConsumerRecord[bytes, bytes],
        keys: Mapping[str, OfficeKey],
        consent_keys: Mapping[str, OfficeKey] | None = None,
    ) -> DeliveredEvent:
        cloud_event = CloudEvent.from_headers(record.headers)
        if cloud_event.type == CONSENT_CHANGED:
            return self._consent_change(record, cloud_event, consent_keys or {})
        subject, body = decode(record.value or b"")
        forms = (
            cloud_event.type,
            f"{cloud_event.type}{DISCLOSURE_SUFFIX}",
            f"{cloud_event.type}{DELIVERY_SUFFIX}",
        )
        if subject not in forms:
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

    async def run(self, stop: asyncio.Event) -> None:
        group_id = f"{self.settings.topic_prefix}.agency.{self.agency}"
        consumer = kafka.consumer(
            self.settings,
            self.topics.agency(self.agency),
            group_id=group_id,
            principal=agency_principal(self.agency),
            client_id=f"tuo-agency-{self.agency}",
            **self.consumer_options,
        )
        producer = kafka.producer(
            self.settings, principal=agency_principal(self.agency), client_id=f"tuo-agency-{self.agency}"
        )
        LAG.watch(group_id, consumer)
        try:
            await producer.start()
            await consumer.start()
            log.info("agency_consumer_started", agency=self.agency)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=200)
                for tp, records in batches.items():
                    if tp not in consumer.assignment():
                        continue  # moved to another consumer while an earlier batch ran; it reads these
                    await self._while_polling(consumer, self._process(producer, tp, records))
                    try:
                        await consumer.commit({tp: records[-1].offset + 1})
                    except (CommitFailedError, IllegalStateError):
                        # The partition moved to another consumer meanwhile; it re-reads these
                        # records and the inbox answers them with the receipts already sent.
                        log.warning("agency_commit_failed", agency=self.agency, partition=tp.partition)
        finally:
            LAG.forget(consumer)
            await consumer.stop()
            await producer.stop()

    async def _while_polling(self, consumer: kafka.AIOKafkaConsumer, work: Awaitable[None]) -> None:
        """Run ``work``; if it takes a while, keep polling the group with every partition
        paused, so the broker does not count the consumer as stuck (max_poll_interval_ms)."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_POLL_MS / 1000)
            if done:
                return task.result()
            try:
                while not task.done():
                    consumer.pause(*consumer.assignment())
                    stray = await consumer.getmany(timeout_ms=KEEPALIVE_POLL_MS)
                    # aiokafka still hands out records it fetched before the pause: put them back.
                    for tp, records in stray.items():
                        consumer.seek(tp, records[0].offset)
            finally:
                consumer.resume(*consumer.assignment())
            return task.result()
        except BaseException:
            await _cancelled(task)  # never leave work running after the consumer has stopped
            raise

    def _receipt(
        self, record: ConsumerRecord[bytes, bytes], receipt: Receipt, received_at: datetime
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        issued_at = datetime.now(UTC)
        value = encode(
            "DeliveryReceipt",
            models.DeliveryReceipt(
                event_id=receipt.event_id,
                agency=self.agency,
                outcome=receipt.outcome,
                reason=receipt.reason,
                issued_at=issued_at,
                received_at=received_at,
                duplicate=receipt.duplicate,
            ).avro(),
        )
        receipt_id = f"{receipt.event_id}/{self.agency}/{receipt.outcome}"
        if receipt.duplicate:  # one per repeated delivery, named by where it was read
            receipt_id += f"/repeat/{record.partition}-{record.offset}"
        headers = headers_for(
            value,
            id=receipt_id,
            source=f"/agencies/{self.agency}",
            subject=record.key.decode(errors="replace") if record.key else None,
            time=issued_at,
            schema_base_url=self.settings.schema_base_url(),
        )
        return value, headers

    async def _send_receipt(
        self,
        producer: kafka.AIOKafkaProducer,
        record: ConsumerRecord[bytes, bytes],
        receipt: Receipt,
        received_at: datetime,
    ) -> asyncio.Future[object]:
        value, headers = self._receipt(record, receipt, received_at)
        sent: asyncio.Future[object] = await producer.send(
            self.topics.receipts(self.agency), value=value, key=record.key, headers=headers
        )
        sent.add_done_callback(
            _counted(RECEIPTS_SENT.labels(agency=self.agency, outcome=receipt.outcome.lower()))
        )
        return sent

    async def _handle(
        self,
        producer: kafka.AIOKafkaProducer,
        record: ConsumerRecord[bytes, bytes],
        event: DeliveredEvent,
        received_at: datetime,
        pending: list[asyncio.Future[object]],
    ) -> Receipt:
        handling = asyncio.ensure_future(handle_with_retries(self.pool, self.agency, event, self.handler))
        try:
            done, _ = await asyncio.wait({handling}, timeout=self.received_after)
            if not done:  # tell the registrar the agency has it while the handler works on
                interim = Receipt(event.event_id, "RECEIVED", None)
                pending.append(await self._send_receipt(producer, record, interim, received_at))
            return await handling
        except BaseException:
            await _cancelled(handling)
            raise

    async def _process(
        self,
        producer: kafka.AIOKafkaProducer,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
    ) -> None:
        pending: list[asyncio.Future[object]] = []
        receipted: list[str] = []

        async def to_dead_letters(record: ConsumerRecord[bytes, bytes], reason: str) -> None:
            component = f"agency:{self.agency}"
            letter = dead_letter(record, component, reason)
            sent = await producer.send(
                self.topics.agency_dead_letters(self.agency),
                value=letter.value,
                key=letter.key,
                headers=letter.headers,
            )
            sent.add_done_callback(_counted(DEAD_LETTERS.labels(component=component)))
            pending.append(sent)
            log.warning(
                "event_dead_lettered",
                agency=self.agency,
                partition=tp.partition,
                offset=record.offset,
                reason=reason,
            )

        # One key registry read at most per batch, and only for a key not seen before.
        # A consent change's key is the consent service's, from its own ring.
        changes = {id(r) for r in records if _ce_type(r) == CONSENT_CHANGED}
        keys = await self.keys.resolve(
            k for k in map(key_id_of, (r.headers for r in records if id(r) not in changes)) if k
        )
        consent_keys = (
            await self.consent_keys.resolve(
                k for k in map(key_id_of, (r.headers for r in records if id(r) in changes)) if k
            )
            if changes
            else {}
        )
        for record in records:
            # Every line about this event, the handler's included, names it.
            with structlog.contextvars.bound_contextvars(event_id=_ce_id(record)):
                received_at = datetime.now(UTC)
                try:
                    event = self._event(record, keys, consent_keys)
                except (MissingCloudEventHeader, UndecodableMessage, SignatureRejected, ValueError) as exc:
                    await to_dead_letters(record, str(exc))
                    continue
                try:
                    receipt = await self._handle(producer, record, event, received_at, pending)
                except HandlerFailed as failure:
                    await to_dead_letters(record, str(failure))
                    receipt = Receipt(event.event_id, "REJECTED", str(failure))
                if event.event_id in receipted:  # a second copy in this very batch
                    receipt = replace(receipt, duplicate=True)
                pending.append(await self._send_receipt(producer, record, receipt, received_at))
                receipted.append(event.event_id)
                log.info(
                    "event_handled",
                    agency=self.agency,
                    event_id=event.event_id,
                    outcome=receipt.outcome,
                    duplicate=receipt.duplicate,
                )
        # Offsets are committed by the caller only after every receipt is durable.
        await asyncio.gather(*pending)
        if receipted:
            await mark_receipted(self.pool, self.agency, receipted)


def _ce_id(record: ConsumerRecord[bytes, bytes]) -> str | None:
    """The event id a message claims (read before it is decoded, so a dead letter names it too)."""
    return next((bytes(v).decode(errors="replace") for k, v in record.headers if k == "ce_id"), None)


def _ce_type(record: ConsumerRecord[bytes, bytes]) -> str | None:
    found = next((bytes(v).decode(errors="replace") for k, v in record.headers if k == "ce_type"), None)
    return None if found is None else found.removeprefix(f"{NAMESPACE}.")


def _counted(counter: Counter) -> Callable[[asyncio.Future[object]], None]:
    """A done-callback that counts a send once the broker has acknowledged it."""

    def count(sent: asyncio.Future[object]) -> None:
        if not sent.cancelled() and sent.exception() is None:
            counter.inc()

    return count
