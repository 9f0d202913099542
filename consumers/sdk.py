"""The agency SDK: everything an agency needs to join the bus.

``AgencyConsumer`` reads the agency's own topic (read_committed) a poll batch at a
time. It decodes each event, checks the registration office's signature over the
fields delivered (with the office's key from the key registry, so the broker need
not be trusted; see ``schemas.signatures``), and then, in **one database
transaction per batch**, claims the events in the agency's inbox (de-duplication
by event id, one statement for the batch) and hands the new ones to the agency's
handler. It then emits a ``DeliveryReceipt`` per event to ``tuo.receipts.<agency>``
and commits the offsets only after the receipts are acknowledged by the broker;
it polls and applies the next batch meanwhile. A message that does not decode or
whose signature does not hold goes to dead letters and is never handed over.

A handler is either a function of one event (``Handler``), applied to each event
of the batch in turn, each in its own savepoint; or an object with
``handle_batch(events, conn)`` (``BatchHandler``) that applies the batch set-wise
and returns the events it rejects, with why. A handler rejects an event by raising
``RejectEvent("why")`` (or, set-wise, by naming it); the agency then sends a
``REJECTED`` receipt carrying that reason. When a batch fails any other way, it is
applied again one event at a time, each in its own transaction and retried, so
that only the event at fault is rejected and dead-lettered. A batch still being
applied after ``received_after`` seconds gets a ``RECEIVED`` receipt for each of its
events meanwhile, and the consumer keeps polling (with its partitions paused) so a
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
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeAlias, runtime_checkable

import asyncpg
import structlog
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumers.receipts import Receipt as Receipt  # part of the SDK's face
from consumers.receipts import ReceiptWriter
from runtime import kafka
from runtime.access import agency_principal
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.keyring import KeyRing
from runtime.metrics import DEAD_LETTERS, LAG, RECEIPTS_SENT
from runtime.settings import Settings
from schemas import UndecodableMessage, decode
from schemas.catalogue import DELIVERY_SUFFIX, DISCLOSURE_SUFFIX
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader
from schemas.consent_signatures import CONSENT_CHANGED, verify_consent_change
from schemas.signatures import OfficeKey, SignatureRejected, SignedEvent, read_signature, verify

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


@runtime_checkable
class BatchHandler(Protocol):
    """Applies ``events`` (new to the agency, in the order delivered) in the caller's
    transaction and returns those it rejects: event id → reason. A rejected event must
    leave no effect. Raising fails the whole batch, which is then applied one event at
    a time (``handle_batch([event], conn)``) to find the event at fault."""

    async def handle_batch(
        self, events: Sequence[DeliveredEvent], conn: asyncpg.Connection
    ) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class EachInTurn:
    """A per-event handler applied to a batch: each event in order. A rejection undoes
    only that event's work: the batch runs under one savepoint, and only when an event
    is rejected is it run again with a savepoint per event (rejections are rare, and a
    savepoint per event costs two round trips each)."""

    handler: Handler

    async def handle_batch(
        self, events: Sequence[DeliveredEvent], conn: asyncpg.Connection
    ) -> Mapping[str, str]:
        if len(events) > 1:
            try:
                async with conn.transaction():
                    for event in events:
                        await self.handler(event, conn)
                return {}
            except RejectEvent:
                pass  # all of it undone: each in its own savepoint, to undo only the rejected
        rejected: dict[str, str] = {}
        for event in events:
            try:
                async with conn.transaction():
                    await self.handler(event, conn)
            except RejectEvent as rejection:
                rejected[event.event_id] = rejection.reason
        return rejected


def as_batch_handler(handler: Handler | BatchHandler) -> BatchHandler:
    return handler if isinstance(handler, BatchHandler) else EachInTurn(handler)


def one_at_a_time(handler: BatchHandler) -> Handler:
    """A batch handler as a handler of one event (to isolate the event a batch failed on)."""
    if isinstance(handler, EachInTurn):
        return handler.handler

    async def handle(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        rejected = await handler.handle_batch([event], conn)
        if event.event_id in rejected:
            raise RejectEvent(rejected[event.event_id])

    return handle


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

# --- the inbox: each event applied once ------------------------------------------------------

# Claims a batch: the rows inserted now are the events new to the agency. Ids come
# sorted, so two consumers racing over the same events (during a rebalance) take the
# row locks in the same order, and the second waits for the first rather than deadlock.
_CLAIM = (
    "INSERT INTO agency.inbox (agency, event_id, event_type, outcome, subject_id)"
    " SELECT $1, c.event_id, c.event_type, 'APPLIED', c.subject_id"
    "   FROM unnest($2::uuid[], $3::text[], $4::text[]) AS c(event_id, event_type, subject_id)"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)
_EARLIER = (
    "SELECT event_id, outcome, reason, receipted_at FROM agency.inbox"
    " WHERE agency = $1 AND event_id = ANY($2::uuid[])"
)
_REJECT = (
    "UPDATE agency.inbox i SET outcome = 'REJECTED', reason = r.reason"
    "  FROM unnest($2::uuid[], $3::text[]) AS r(event_id, reason)"
    " WHERE i.agency = $1 AND i.event_id = r.event_id"
)


def _earlier_receipt(row: asyncpg.Record) -> Receipt:
    # Never receipted (the consumer stopped between applying and receipting):
    # this is the first receipt, not a duplicate.
    return Receipt(str(row["event_id"]), row["outcome"], row["reason"], row["receipted_at"] is not None)


async def apply_batch(
    pool: asyncpg.Pool, agency: str, events: Sequence[DeliveredEvent], handler: BatchHandler
) -> dict[str, Receipt]:
    """Apply each of ``events`` (distinct ids) at most once, in one transaction: claim
    them all in the inbox, hand the new ones to ``handler``, record its rejections.
    Events the inbox already held get their first outcome back. Returns a receipt per
    event id; raises whatever the handler raised (nothing is then kept)."""
    claims = sorted((e.event_id, e.event_type, subject_of(e)) for e in events)
    async with pool.acquire() as conn, conn.transaction():
        claimed = {
            str(row["event_id"])
            for row in await conn.fetch(
                _CLAIM, agency, [c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims]
            )
        }
        receipts: dict[str, Receipt] = {}
        if len(claimed) < len(events):
            held = [e.event_id for e in events if e.event_id not in claimed]
            for row in await conn.fetch(_EARLIER, agency, held):
                receipts[str(row["event_id"])] = _earlier_receipt(row)
        fresh = [e for e in events if e.event_id in claimed]
        rejected = dict(await handler.handle_batch(fresh, conn)) if fresh else {}
        if rejected:
            await conn.execute(_REJECT, agency, list(rejected), list(rejected.values()))
        for event in fresh:
            reason = rejected.get(event.event_id)
            receipts[event.event_id] = Receipt(
                event.event_id, "APPLIED" if reason is None else "REJECTED", reason
            )
    return receipts


async def handle_once(pool: asyncpg.Pool, agency: str, event: DeliveredEvent, handler: Handler) -> Receipt:
    """Apply one event at most once, even with two consumers racing during a
    rebalance: the inbox row is claimed first, in the handler's own transaction,
    so a second claimant waits on it and then finds the first receipt."""
    async with pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(_CLAIM, agency, [event.event_id], [event.event_type], [subject_of(event)])
        if not claimed:
            [earlier] = await conn.fetch(_EARLIER, agency, [event.event_id])
            return _earlier_receipt(earlier)
        try:
            async with conn.transaction():  # a savepoint: a rejection undoes only the handler's work
                await handler(event, conn)
        except RejectEvent as rejection:
            await conn.execute(_REJECT, agency, [event.event_id], [rejection.reason])
            return Receipt(event.event_id, "REJECTED", rejection.reason)
        return Receipt(event.event_id, "APPLIED", None)


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


RECEIVED_AFTER_SECONDS = 2.0  # a batch still being applied then gets RECEIVED receipts meanwhile
KEEPALIVE_POLL_MS = 500  # how often a consumer waiting on a slow batch polls its group
MAX_BATCH = 1000  # records per poll: one transaction and one flush of receipts
YIELD_EVERY = 100  # messages verified between letting the event loop run others


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


# --- reading a batch ------------------------------------------------------------------------

Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass
class Read:
    """A message's headers, each read once: its CloudEvent and its signature. Why they
    do not hold is kept, to be said in the order a message is checked in: envelope,
    value, then signature."""

    record: Record
    cloud_event: CloudEvent | None = None
    problem: str | None = None  # the CloudEvents headers do not hold: why
    signed: SignedEvent | SignatureRejected | None = None

    @classmethod
    def of(cls, record: Record) -> Read:
        try:
            cloud_event = CloudEvent.from_headers(record.headers)
        except (MissingCloudEventHeader, ValueError) as exc:
            return cls(record, problem=str(exc))
        try:
            return cls(record, cloud_event, signed=read_signature(record.headers))
        except SignatureRejected as rejected:
            return cls(record, cloud_event, signed=rejected)

    @property
    def is_consent_change(self) -> bool:
        return self.cloud_event is not None and self.cloud_event.type == CONSENT_CHANGED

    @property
    def key_id(self) -> str | None:
        return self.signed.manifest.key_id if isinstance(self.signed, SignedEvent) else None

    def signature(self) -> SignedEvent:
        if not isinstance(self.signed, SignedEvent):
            raise self.signed or SignatureRejected("the signature was not read")
        return self.signed


@dataclass
class Batch:
    """A poll batch read and verified: its distinct events in order, and each message
    with the event it carries (None: it goes to dead letters)."""

    records: list[Record]
    received_at: datetime
    events: dict[str, DeliveredEvent]
    delivered: list[tuple[Read, DeliveredEvent | None]]


@dataclass
class Outgoing:
    """A batch handled and its receipts queued: what remains is to await the broker's
    acknowledgements, then remember the receipts and commit the offsets."""

    offsets: dict[TopicPartition, int]
    sent: list[asyncio.Future[Any]] = field(default_factory=list)
    receipted: list[str] = field(default_factory=list)  # event ids
    counts: Counter[str] = field(default_factory=Counter)  # receipts by outcome
    dead_letters: int = 0


def _consent_change(agency: str, read: Read, keys: Mapping[str, OfficeKey]) -> DeliveredEvent:
    assert read.cloud_event is not None
    subject, body = decode(read.record.value or b"")
    if subject != CONSENT_CHANGED:
        raise UndecodableMessage(f"ce_type says {CONSENT_CHANGED} but the value is {subject}")
    try:
        change_id = str(uuid.UUID(read.cloud_event.id))
    except ValueError:
        raise UndecodableMessage("ce_id is not a UUID") from None
    signed = read.signature()
    verify_consent_change(
        signed,
        keys.get(signed.manifest.key_id),
        event_id=read.cloud_event.id,
        source=read.cloud_event.source,
        body=body,
    )
    if body.get("agency") != agency:
        raise NotForThisAgency(f"a consent change for {body.get('agency')!r} reached {agency!r}")
    return DeliveredEvent(event_id=change_id, event_type=CONSENT_CHANGED, record=body)


def checked_event(
    agency: str, read: Read, keys: Mapping[str, OfficeKey], consent_keys: Mapping[str, OfficeKey]
) -> DeliveredEvent:
    """The event (or consent change) a message carries for ``agency``, decoded and with its
    signature checked against ``keys`` (a consent change's against ``consent_keys``).
    Raises ``UndecodableMessage``, ``SignatureRejected`` or ``ValueError`` with why not."""
    if read.is_consent_change:
        return _consent_change(agency, read, consent_keys)
    cloud_event = read.cloud_event
    assert cloud_event is not None
    subject, body = decode(read.record.value or b"")
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
    signed = read.signature()
    verify(
        signed,
        keys.get(signed.manifest.key_id),
        event_type=cloud_event.type,
        event_id=cloud_event.id,
        source=cloud_event.source,
        body=body,
    )
    return DeliveredEvent(event_id=event_id, event_type=cloud_event.type, record=body)


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
        handler: Handler | BatchHandler,
        keys: KeyRing | None = None,
        *,
        consent_keys: KeyRing | None = None,
        received_after: float = RECEIVED_AFTER_SECONDS,
        **consumer_options: Any,
    ):
        self.settings = settings
        self.pool = pool
        self.agency = agency
        self.handler = as_batch_handler(handler)
        self.topics = Topics(settings.topic_prefix)
        self.keys = keys or KeyRing.from_database(pool)
        self.consent_keys = consent_keys or KeyRing.consent_from_database(pool)
        self.received_after = received_after
        self.consumer_options = consumer_options
        self.receipts = ReceiptWriter(agency, settings.schema_base_url())

    def _event(
        self, read: Read, keys: Mapping[str, OfficeKey], consent_keys: Mapping[str, OfficeKey]
    ) -> DeliveredEvent:
        return checked_event(self.agency, read, keys, consent_keys)

    async def run(self, stop: asyncio.Event) -> None:
        group_id = f"{self.settings.topic_prefix}.agency.{self.agency}"
        consumer = kafka.consumer(
            self.settings,
            self.topics.agency(self.agency),
            group_id=group_id,
            principal=agency_principal(self.agency),
            client_id=f"tuo-agency-{self.agency}",
            role="agency",
            **self.consumer_options,
        )
        producer = kafka.producer(
            self.settings,
            principal=agency_principal(self.agency),
            client_id=f"tuo-agency-{self.agency}",
            role="agency",
        )
        LAG.watch(group_id, consumer)
        # Three batches in hand at most, each a stage behind the one after it: one being
        # read and verified (CPU), the one before it in its transaction (database), and the
        # one before that with its receipts on their way to the broker.
        applying: asyncio.Future[Outgoing] | None = None
        outgoing: Outgoing | None = None
        try:
            await producer.start()
            await consumer.start()
            log.info("agency_consumer_started", agency=self.agency)
            while not stop.is_set():
                # While earlier batches are in hand, take only what is already fetched.
                busy = applying is not None or outgoing is not None
                polled = await consumer.getmany(timeout_ms=0 if busy else 500, max_records=MAX_BATCH)
                assigned = consumer.assignment()
                # A partition moved to another consumer while an earlier batch ran: it reads these.
                records = [r for tp, batch in polled.items() if tp in assigned for r in batch]
                read = await self._read(records) if records else None
                if applying is not None:
                    handled = await self._while_polling(consumer, applying)
                    applying = None
                    if outgoing is not None:
                        await self._settle(consumer, outgoing)
                    outgoing = handled
                elif outgoing is not None and read is None:
                    await self._settle(consumer, outgoing)
                    outgoing = None
                if read is not None:
                    applying = asyncio.ensure_future(self._apply_and_receipt(producer, read))
            if applying is not None:  # stopping: finish what is in hand, then commit it
                handled = await self._while_polling(consumer, applying)
                applying = None
                if outgoing is not None:
                    await self._settle(consumer, outgoing)
                outgoing = handled
            if outgoing is not None:
                await self._settle(consumer, outgoing)
        finally:
            if applying is not None:
                await _cancelled(applying)
            LAG.forget(consumer)
            await consumer.stop()
            await producer.stop()

    async def _settle(self, consumer: kafka.AIOKafkaConsumer, outgoing: Outgoing) -> None:
        """Once the broker holds a batch's receipts: remember them and commit its offsets."""
        await asyncio.gather(*outgoing.sent)
        for outcome, count in outgoing.counts.items():
            RECEIPTS_SENT.labels(agency=self.agency, outcome=outcome.lower()).inc(count)
        if outgoing.dead_letters:
            DEAD_LETTERS.labels(component=f"agency:{self.agency}").inc(outgoing.dead_letters)
        if outgoing.receipted:
            await mark_receipted(self.pool, self.agency, outgoing.receipted)
        try:
            await consumer.commit(outgoing.offsets)
        except (CommitFailedError, IllegalStateError):
            # The partitions moved to another consumer meanwhile; it re-reads these
            # records and the inbox answers them with the receipts already sent.
            log.warning("agency_commit_failed", agency=self.agency, partitions=len(outgoing.offsets))

    async def _while_polling(self, consumer: kafka.AIOKafkaConsumer, work: Awaitable[Outgoing]) -> Outgoing:
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

    async def _read(self, records: list[Record]) -> Batch:
        """Read and verify every message of a poll batch: the events to apply, in order."""
        received_at = datetime.now(UTC)
        reads = [Read.of(record) for record in records]
        # One key registry read at most per batch, and only for a key not seen before.
        # A consent change's key is the consent service's, from its own ring.
        keys = await self.keys.resolve(r.key_id for r in reads if r.key_id and not r.is_consent_change)
        consent_keys = await self.consent_keys.resolve(
            r.key_id for r in reads if r.key_id and r.is_consent_change
        )
        events: dict[str, DeliveredEvent] = {}  # the batch's distinct events, in order
        delivered: list[tuple[Read, DeliveredEvent | None]] = []  # None: to dead letters
        for n, read in enumerate(reads, 1):
            if n % YIELD_EVERY == 0:  # components share an event loop under `tuo run`
                await asyncio.sleep(0)
            if read.problem is None:
                try:
                    event = self._event(read, keys, consent_keys)
                except (UndecodableMessage, SignatureRejected, ValueError) as exc:
                    read.problem = str(exc)
                else:
                    events.setdefault(event.event_id, event)
                    delivered.append((read, event))
                    continue
            delivered.append((read, None))
        return Batch(records, received_at, events, delivered)

    async def _apply_and_receipt(self, producer: kafka.AIOKafkaProducer, batch: Batch) -> Outgoing:
        """Apply a batch's events in one transaction, then queue a receipt per event and a
        dead letter per message refused."""
        records, received_at, events, delivered = (
            batch.records,
            batch.received_at,
            batch.events,
            batch.delivered,
        )
        outgoing = Outgoing({TopicPartition(r.topic, r.partition): r.offset + 1 for r in records})
        applying = asyncio.ensure_future(self._apply(list(events.values())))
        try:
            done, _ = await asyncio.wait({applying}, timeout=self.received_after)
            if not done:  # tell the registrars the agency has them while the handler works on
                first = {event.event_id: read.record for read, event in reversed(delivered) if event}
                interim = [(first[e], Receipt(e, "RECEIVED", None)) for e in events]
                await self._send_receipts(producer, interim, received_at, outgoing)
            receipts, failed = await applying
        except BaseException:
            await _cancelled(applying)
            raise

        letters: list[tuple[Record, str]] = []
        final: list[tuple[Record, Receipt]] = []
        sent_for: set[str] = set()
        for read, copy in delivered:
            if copy is None:
                letters.append((read.record, read.problem or "unreadable"))
                continue
            if copy.event_id in failed and copy.event_id not in sent_for:
                letters.append((read.record, failed[copy.event_id]))
            receipt = receipts[copy.event_id]
            if copy.event_id in sent_for:  # a second copy in this very batch
                receipt = replace(receipt, duplicate=True)
            final.append((read.record, receipt))
            sent_for.add(copy.event_id)
        await self._send_dead_letters(producer, letters, outgoing)
        await self._send_receipts(producer, final, received_at, outgoing)
        outgoing.receipted = list(sent_for)
        for _, receipt in final:  # a line per event at DEBUG only: one per batch below
            log.debug(
                "event_handled",
                agency=self.agency,
                event_id=receipt.event_id,
                outcome=receipt.outcome,
                duplicate=receipt.duplicate,
            )
        log.info(
            "batch_handled",
            agency=self.agency,
            messages=len(records),
            events=len(events),
            duplicates=sum(receipt.duplicate for _, receipt in final),
            rejected=sum(receipt.outcome == "REJECTED" for _, receipt in final),
            dead_lettered=len(letters),
        )
        return outgoing

    async def _apply(self, events: list[DeliveredEvent]) -> tuple[dict[str, Receipt], dict[str, str]]:
        """Receipts for ``events``, applied in one transaction; if that fails, one at a time
        (retried), so that only an event its handler keeps failing on is rejected. Returns
        the receipts, and the events that failed that way, with why (for dead letters)."""
        if not events:
            return {}, {}
        try:
            return await apply_batch(self.pool, self.agency, events, self.handler), {}
        except Exception as exc:  # noqa: BLE001 - whatever it was, one at a time finds the event at fault
            log.warning(
                "batch_failed_applying_one_at_a_time",
                agency=self.agency,
                events=len(events),
                error=type(exc).__name__,
            )
        handler = one_at_a_time(self.handler)
        receipts: dict[str, Receipt] = {}
        failed: dict[str, str] = {}
        for event in events:
            with structlog.contextvars.bound_contextvars(event_id=event.event_id):
                try:
                    receipts[event.event_id] = await handle_with_retries(
                        self.pool, self.agency, event, handler
                    )
                except HandlerFailed as failure:
                    failed[event.event_id] = str(failure)
                    receipts[event.event_id] = Receipt(event.event_id, "REJECTED", str(failure))
        return receipts, failed

    async def _send_receipts(
        self,
        producer: kafka.AIOKafkaProducer,
        receipts: list[tuple[Record, Receipt]],
        received_at: datetime,
        outgoing: Outgoing,
    ) -> None:
        """Queue a receipt for each message, as whole record batches."""
        issued_at = datetime.now(UTC)
        headers = self.receipts.headers(issued_at)
        messages = []
        for record, receipt in receipts:
            messages.append(
                self.receipts.message(
                    receipt,
                    key=record.key,
                    repeat_at=f"{record.partition}-{record.offset}",
                    issued_at=issued_at,
                    received_at=received_at,
                    headers=headers,
                )
            )
            outgoing.counts[receipt.outcome] += 1
        outgoing.sent += await kafka.send_many(producer, self.topics.receipts(self.agency), messages)

    async def _send_dead_letters(
        self, producer: kafka.AIOKafkaProducer, letters: list[tuple[Record, str]], outgoing: Outgoing
    ) -> None:
        if not letters:
            return
        component = f"agency:{self.agency}"
        messages = []
        for record, reason in letters:
            letter = dead_letter(record, component, reason)
            messages.append((letter.key, letter.value, letter.headers))
            log.warning(
                "event_dead_lettered",
                agency=self.agency,
                event_id=_ce_id(record),
                partition=record.partition,
                offset=record.offset,
                reason=reason,
            )
        outgoing.sent += await kafka.send_many(
            producer, self.topics.agency_dead_letters(self.agency), messages
        )
        outgoing.dead_letters += len(letters)


def _ce_id(record: Record) -> str | None:
    """The event id a message claims (read before it is decoded, so a dead letter names it too)."""
    return next((bytes(v).decode(errors="replace") for k, v in record.headers if k == "ce_id"), None)
