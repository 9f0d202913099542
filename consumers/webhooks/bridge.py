"""The webhook bridge: an agency's Kafka consumer, run by the bus for an agency that
cannot run one, which POSTs each message to the agency's HTTPS endpoint.

It works in two halves, joined by ``webhook_delivery`` in PostgreSQL (retries that
survive a restart, as Open Notificaties keeps them):

- **Queueing.** It reads the agency's topic (read_committed, in the agency's own
  consumer group, as the agency's principal) a poll batch at a time, queues the batch
  in one statement, and only then commits the offsets. One row per event id: the same
  message read again (after a restart) is not queued again; a new copy of an event
  delivered or given up on (an operator's redelivery, a replay, a redrive) is queued
  afresh. The value and the headers are kept sealed, and dropped once it is settled.
- **Delivering.** It POSTs the first pending delivery of each subject, at most the
  endpoint's ``max_in_flight`` at once, so one person's events arrive in order. One
  bridge per agency delivers (an advisory lock); another waits to take over. Every
  attempt is logged (time, latency, status code or error). A 2xx answer is the agency's
  receipt that it has the event: a ``RECEIVED`` receipt goes to the agency's receipt
  topic, and the sealed copy of the event is dropped. Any other answer, a timeout or a
  refused connection is tried again after an exponential backoff with jitter, until
  the endpoint's retry window (24 hours by default) has passed since the event was
  queued; then it is given up on, tried again or not (an endpoint down for long is
  tried only now and then): the message goes to the agency's dead letters (``tuo dlq``,
  ``tuo receipts redeliver``) and its receipt is flagged overdue at once.
  An endpoint that keeps failing trips a circuit breaker: it is left alone for a
  while, then tried with one delivery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import structlog
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord

from consumers.receipts import Receipt, ReceiptWriter
from consumers.webhooks import requests
from consumers.webhooks.endpoints import Endpoint, NoWebhookEndpoint, endpoint_of
from consumers.webhooks.requests import CircuitBreaker, NotDeliverable, RetryPolicy
from runtime import kafka
from runtime.access import agency_principal
from runtime.dead_letters import dead_letter
from runtime.metrics import DEAD_LETTERS, WEBHOOK_ATTEMPTS
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.cloudevents import NAMESPACE

log = structlog.get_logger(__name__)

MAX_BATCH = 1000
IDLE_POLL_SECONDS = 1.0  # how often the dispatcher looks for retries fallen due
READY_AHEAD = 200  # due deliveries read at a time
ENDPOINT_REFRESH_SECONDS = 5.0  # a changed endpoint, limit or secret is used within this
STANDBY_POLL_SECONDS = 2.0  # how often a second bridge for an agency tries to take over
MAX_ERROR = 200
MAX_ANSWER = 64 * 1024  # bytes of an endpoint's answer read, at most; none are kept

_QUEUE = (
    "INSERT INTO webhook_delivery"
    " (agency, event_id, event_type, subject, headers, value, source_partition, source_offset)"
    " SELECT $1, q.event_id, q.event_type, q.subject, q.headers, q.value, q.part, q.off"
    "   FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bytea[], $6::bytea[], $7::int[], $8::bigint[])"
    "     AS q(event_id, event_type, subject, headers, value, part, off)"
    # A new copy of an event delivered or given up (not the same message read again after a
    # restart): queued afresh, its attempts numbered on from the earlier ones.
    " ON CONFLICT (agency, event_id) DO UPDATE SET status = 'pending', next_attempt_at = now(),"
    "   finished_at = NULL, queued_at = now(), value = EXCLUDED.value, headers = EXCLUDED.headers,"
    "   source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset,"
    "   seq = nextval(pg_get_serial_sequence('webhook_delivery', 'seq'))"
    " WHERE webhook_delivery.status <> 'pending'"
    "   AND (webhook_delivery.source_partition, webhook_delivery.source_offset)"
    "       IS DISTINCT FROM (EXCLUDED.source_partition, EXCLUDED.source_offset)"
)
# The first pending delivery of each subject that is due and not being attempted already.
_DUE = (
    "SELECT h.* FROM ("
    "  SELECT DISTINCT ON (subject) event_id, subject, seq, headers, value, attempts, queued_at,"
    "         next_attempt_at, source_partition, source_offset"
    "    FROM webhook_delivery WHERE agency = $1 AND status = 'pending' ORDER BY subject, seq) h"
    " WHERE h.next_attempt_at <= now() AND NOT (h.subject = ANY($2::text[]))"
    " ORDER BY h.seq LIMIT $3"
)
_LOG_ATTEMPTS = (
    "INSERT INTO webhook_attempt"
    " (agency, event_id, attempt, started_at, latency_ms, status_code, error, succeeded)"
    " SELECT $1, * FROM unnest($2::uuid[], $3::int[], $4::timestamptz[], $5::int[], $6::int[],"
    "                          $7::text[], $8::bool[])"
    " ON CONFLICT DO NOTHING"
)
# Delivered or given up: the sealed copy of the event and its headers are dropped either
# way. Each update applies only to the delivery as it was when attempted.
_FINISH = (
    "UPDATE webhook_delivery d SET status = f.status, attempts = f.attempts, finished_at = now(),"
    "       value = NULL, headers = NULL"
    "  FROM unnest($2::uuid[], $3::int[], $4::text[]) AS f(event_id, attempts, status)"
    " WHERE d.agency = $1 AND d.event_id = f.event_id AND d.status = 'pending'"
    "   AND d.attempts = f.attempts - 1"
)
_RETRY = (
    "UPDATE webhook_delivery d SET attempts = r.attempts, next_attempt_at = r.at"
    "  FROM unnest($2::uuid[], $3::int[], $4::timestamptz[]) AS r(event_id, attempts, at)"
    " WHERE d.agency = $1 AND d.event_id = r.event_id AND d.status = 'pending'"
    "   AND d.attempts = r.attempts - 1"
)
# Pending past the endpoint's retry window: given up on without another attempt (an
# endpoint down for long is tried only now and then, by the circuit breaker).
_EXPIRED = (
    "SELECT event_id, subject, headers, value, attempts, queued_at, source_partition, source_offset"
    "  FROM webhook_delivery WHERE agency = $1 AND status = 'pending' AND queued_at < now() - $2::interval"
    "   AND NOT (subject = ANY($3::text[])) ORDER BY seq LIMIT $4"
)
_EXPIRE = (
    "UPDATE webhook_delivery SET status = 'dead', finished_at = now(), value = NULL, headers = NULL"
    " WHERE agency = $1 AND event_id = ANY($2::uuid[]) AND status = 'pending'"
)
_FLAG_OVERDUE = (
    "INSERT INTO receipt_overdue (event_id, agency, delivered_at, due_at)"
    " SELECT e, $1, q, now() FROM unnest($2::uuid[], $3::timestamptz[]) AS g(e, q)"
    " ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True)
class Attempted:
    """One attempt that has ended, before it is recorded."""

    row: asyncpg.Record  # the delivery as it was due
    value: bytes  # the message's value, opened
    headers: list[tuple[str, str]]  # its forwarded headers, opened
    started_at: datetime
    latency_ms: int
    status_code: int | None
    error: str | None  # None: the endpoint took it
    final: bool = False  # no point trying again: the message cannot be a request

    @property
    def event_id(self) -> uuid.UUID:
        event_id: uuid.UUID = self.row["event_id"]
        return event_id

    @property
    def number(self) -> int:
        return int(self.row["attempts"]) + 1


def _sealed_for(agency: str, event_id: uuid.UUID) -> bytes:
    return f"webhook:{agency}:{event_id}".encode()


def _headers_sealed_for(agency: str, event_id: uuid.UUID) -> bytes:
    return f"webhook-headers:{agency}:{event_id}".encode()


class LockLost(RuntimeError):
    """The connection holding the bridge's delivery lock is gone: another bridge may deliver."""


def _http_client(settings: Settings, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if settings.webhook_cafile is not None:
        verify = ssl.create_default_context(cafile=str(settings.webhook_cafile))
    return httpx.AsyncClient(
        verify=verify,
        timeout=settings.webhook_timeout_seconds,
        follow_redirects=False,  # an endpoint that moves is reconfigured, not followed
        transport=transport,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


class WebhookBridge:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        agency: str,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.agency = agency
        self.policy = policy or RetryPolicy(first=settings.webhook_first_retry_seconds)
        self.breaker = breaker or CircuitBreaker()
        self.transport = transport
        self.sealer = PayloadSealer.from_settings(settings)
        self.topics = kafka.Topics(settings.topic_prefix)
        self.receipts = ReceiptWriter(agency, settings.schema_base_url())
        self._queued = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        principal = agency_principal(self.agency)
        consumer = kafka.consumer(
            self.settings,
            self.topics.agency(self.agency),
            group_id=f"{self.settings.topic_prefix}.agency.{self.agency}",
            principal=principal,
            client_id=f"tuo-webhooks-{self.agency}",
            role="agency",
        )
        producer = kafka.producer(
            self.settings, principal=principal, client_id=f"tuo-webhooks-{self.agency}", role="agency"
        )
        async with _http_client(self.settings, self.transport) as client:
            try:
                await producer.start()
                await consumer.start()
                log.info("webhook_bridge_started", agency=self.agency)
                # Either half failing stops the other (and the bridge, which is then restarted).
                async with asyncio.TaskGroup() as halves:
                    halves.create_task(self._queue_from(consumer, producer, stop))
                    halves.create_task(self._deliver(client, producer, stop))
            finally:
                await consumer.stop()
                await producer.stop()

    # --- queueing ------------------------------------------------------------------------------

    async def _queue_from(
        self, consumer: kafka.AIOKafkaConsumer, producer: kafka.AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            polled = await consumer.getmany(timeout_ms=500, max_records=MAX_BATCH)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                continue
            refused = await self.queue(records)
            if refused:
                await self._dead_letters(producer, refused)
            self._queued.set()
            try:
                await consumer.commit({tp: batch[-1].offset + 1 for tp, batch in polled.items() if batch})
            except (CommitFailedError, IllegalStateError):
                # The partitions moved to another bridge meanwhile: it reads these again, and
                # the queue already holds them (one row per event id).
                log.warning("webhook_commit_failed", agency=self.agency, partitions=len(polled))

    async def queue(
        self, records: Sequence[ConsumerRecord[bytes, bytes]]
    ) -> list[tuple[ConsumerRecord[bytes, bytes], str]]:
        """Queue a poll batch in one statement; returns the messages refused, with why."""
        rows: dict[uuid.UUID, tuple[Any, ...]] = {}
        refused = []
        for record in records:
            try:
                headers = requests.forwarded_headers(record.headers)
                found = dict(headers)
                event_id = uuid.UUID(found["ce_id"])
                subject = (record.key or b"").decode("ascii")
                if not subject or record.value is None:
                    raise NotDeliverable("a message needs a key (its subject) and a value")
            except (NotDeliverable, ValueError) as exc:
                refused.append((record, str(exc)))
                continue
            rows.setdefault(  # a second copy in one batch is the same delivery
                event_id,
                (
                    event_id,
                    found["ce_type"].removeprefix(f"{NAMESPACE}."),
                    subject,
                    self.sealer.seal(
                        json.dumps(headers).encode(), _headers_sealed_for(self.agency, event_id)
                    ),
                    self.sealer.seal(record.value, _sealed_for(self.agency, event_id)),
                    record.partition,
                    record.offset,
                ),
            )
        if rows:
            columns = list(zip(*rows.values(), strict=True))
            await self.pool.execute(_QUEUE, self.agency, *[list(c) for c in columns])
        log.info("webhooks_queued", agency=self.agency, messages=len(records), refused=len(refused))
        return refused

    async def _dead_letters(
        self, producer: kafka.AIOKafkaProducer, letters: Sequence[tuple[ConsumerRecord[bytes, bytes], str]]
    ) -> None:
        component = f"webhooks:{self.agency}"
        messages = []
        for record, reason in letters:
            letter = dead_letter(record, component, reason)
            messages.append((letter.key, letter.value, letter.headers))
            log.warning(
                "webhook_dead_lettered",
                agency=self.agency,
                partition=record.partition,
                offset=record.offset,
                reason=reason,
            )
        await asyncio.gather(
            *await kafka.send_many(producer, self.topics.agency_dead_letters(self.agency), messages)
        )
        DEAD_LETTERS.labels(component=component).inc(len(letters))

    # --- delivering ----------------------------------------------------------------------------

    async def _deliver(
        self, client: httpx.AsyncClient, producer: kafka.AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        """Deliver, while this bridge is the agency's only one delivering: it holds an
        advisory lock on a connection of its own, and stops (to be restarted) as soon as
        that connection is gone. A second bridge queues, and waits to take over."""
        async with self.pool.acquire() as conn:
            waiting = False
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", f"webhooks:{self.agency}"
            ):
                if not waiting:
                    log.info("webhook_delivery_standby", agency=self.agency, reason="another bridge delivers")
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), STANDBY_POLL_SECONDS)
                if stop.is_set():
                    return
            await self._deliver_while_locked(client, producer, stop, conn)

    async def _deliver_while_locked(
        self,
        client: httpx.AsyncClient,
        producer: kafka.AIOKafkaProducer,
        stop: asyncio.Event,
        lock: asyncpg.Connection,
    ) -> None:
        """Keep up to the endpoint's limit of POSTs in flight. Attempts that end are settled
        together (one batch of receipts, one transaction), one settlement at a time, while
        the next POSTs go out. A subject stays out of the queue until its delivery is
        settled, so its next event waits for it."""
        posting: dict[str, asyncio.Task[Attempted]] = {}  # subject → its delivery being POSTed
        ended: dict[str, Attempted] = {}  # subject → its attempt, ended, waiting to be settled
        settling: tuple[set[str], asyncio.Task[None]] | None = None  # the settlement under way
        # Due deliveries read ahead, each the first of its subject: one query per READY_AHEAD.
        ready: collections.deque[asyncpg.Record] = collections.deque()
        endpoint: Endpoint | None = None
        read_at = 0.0
        try:
            while not stop.is_set():
                if lock.is_closed():
                    raise LockLost(
                        f"the delivery lock of {self.agency}'s webhooks was lost with its connection"
                    )
                if endpoint is None or time.monotonic() - read_at > ENDPOINT_REFRESH_SECONDS:
                    endpoint = await endpoint_of(self.pool, self.sealer, self.agency)
                    if endpoint is None:
                        raise NoWebhookEndpoint(self.agency)
                    read_at = time.monotonic()
                    # As often: give up on what waited past the retry window, tried or not.
                    busy = [*posting, *ended, *(settling[0] if settling else ())]
                    await self._expire(producer, endpoint, busy)
                    ready.clear()  # read again: some may have been given up on
                room = endpoint.max_in_flight - len(posting)
                allowed = self.breaker.allows(time.monotonic())
                if allowed is not None:
                    room = min(room, allowed - len(posting))
                if room > 0 and not ready:
                    busy = [*posting, *ended, *(settling[0] if settling else ())]
                    ready.extend(await self.pool.fetch(_DUE, self.agency, busy, READY_AHEAD))
                while room > 0 and ready:
                    row = ready.popleft()
                    posting[row["subject"]] = asyncio.create_task(self._attempt(client, endpoint, row))
                    room -= 1
                self._queued.clear()
                woken = asyncio.create_task(self._queued.wait())
                stopping = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait(
                        [woken, stopping, *posting.values(), *([settling[1]] if settling else [])],
                        timeout=IDLE_POLL_SECONDS,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
                    stopping.cancel()
                for subject in [subject for subject, task in posting.items() if task.done()]:
                    ended[subject] = posting.pop(subject).result()
                if settling is not None and settling[1].done():
                    # A settlement that failed (Kafka or PostgreSQL away) stops the bridge, and it
                    # restarts: those deliveries are still pending and are attempted again.
                    settling[1].result()
                    settling = None
                if settling is None and ended:
                    settling = (
                        set(ended),
                        asyncio.create_task(self._settle(producer, endpoint, list(ended.values()))),
                    )
                    ended = {}
        finally:
            # Each ends within the attempt's timeout; one not settled is attempted again.
            await asyncio.gather(
                *posting.values(), *([settling[1]] if settling else []), return_exceptions=True
            )

    async def _expire(self, producer: kafka.AIOKafkaProducer, endpoint: Endpoint, busy: list[str]) -> None:
        """Give up on deliveries pending past the retry window that are not being attempted:
        to dead letters, flagged overdue, no attempt logged (none was made now)."""
        rows = await self.pool.fetch(_EXPIRED, self.agency, endpoint.retry_window, busy, READY_AHEAD)
        if not rows:
            return
        now = datetime.now(UTC)
        expired = []
        for row in rows:
            value, headers = self._opened(row)
            expired.append(
                Attempted(row, value, headers, now, 0, None, "the retry window passed", final=True)
            )
        letters = [
            (
                self._as_read(a),
                f"the webhook endpoint did not take it within {endpoint.retry_window}"
                f" ({a.row['attempts']} attempts)",
            )
            for a in expired
        ]
        await self._dead_letters(producer, letters)
        async with self.pool.acquire() as conn, conn.transaction():
            gone = [a.event_id for a in expired]
            await conn.execute(_EXPIRE, self.agency, gone)
            await conn.execute(_FLAG_OVERDUE, self.agency, gone, [a.row["queued_at"] for a in expired])
        WEBHOOK_ATTEMPTS.labels(agency=self.agency, outcome="given_up").inc(len(expired))
        log.warning("webhooks_expired", agency=self.agency, deliveries=len(expired))

    def _opened(self, row: asyncpg.Record) -> tuple[bytes, list[tuple[str, str]]]:
        """A delivery's value and forwarded headers, unsealed."""
        event_id: uuid.UUID = row["event_id"]
        value = self.sealer.open(row["value"], _sealed_for(self.agency, event_id))
        headers = json.loads(self.sealer.open(row["headers"], _headers_sealed_for(self.agency, event_id)))
        return value, [(name, text) for name, text in headers]

    async def _attempt(self, client: httpx.AsyncClient, endpoint: Endpoint, row: asyncpg.Record) -> Attempted:
        """POST one delivery; what happened (nothing is written here)."""
        event_id: uuid.UUID = row["event_id"]
        value, forwarded = self._opened(row)
        started_at = datetime.now(UTC)
        began = time.monotonic()
        try:
            body, content_type = requests.body(value, endpoint.payload_format)
        except NotDeliverable as exc:
            return Attempted(row, value, forwarded, started_at, 0, None, str(exc), final=True)
        headers = requests.http_headers(
            forwarded,
            content_type=content_type,
            webhook_id=str(event_id),
            body=body,
            secrets=endpoint.secrets,
            now=started_at,
        )
        status_code: int | None = None
        try:
            async with client.stream("POST", endpoint.url, content=body, headers=headers) as answer:
                status_code = answer.status_code
                # Read (and drop) a short answer, so its connection is kept for the next request;
                # stop at a long one (its connection is then closed).
                read = 0
                async for chunk in answer.aiter_raw():
                    read += len(chunk)
                    if read > MAX_ANSWER:
                        break
            error = None if 200 <= status_code < 300 else f"answered HTTP {status_code}"
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:MAX_ERROR]}" if str(exc) else type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - whatever failed this attempt, it is logged and retried
            error = f"could not send: {type(exc).__name__}"
        latency_ms = round((time.monotonic() - began) * 1000)
        return Attempted(row, value, forwarded, started_at, latency_ms, status_code, error)

    async def _settle(
        self, producer: kafka.AIOKafkaProducer, endpoint: Endpoint, ended: list[Attempted]
    ) -> None:
        """Record attempts that ended: for those the endpoint took, their RECEIVED receipts
        first (should that fail, they are POSTed again, and the endpoint knows them by their
        webhook-id), then, in one transaction, every attempt and where each delivery is now."""
        now = datetime.now(UTC)
        delivered = [a for a in ended if a.error is None]
        failed = [a for a in ended if a.error is not None]
        for attempt in failed:
            if attempt.error is not None and not attempt.final:
                self.breaker.failed(time.monotonic())
        if delivered:
            self.breaker.succeeded()
            issued_at = datetime.now(UTC)
            template = self.receipts.headers(issued_at)
            messages = [
                self.receipts.message(
                    Receipt(str(a.event_id), "RECEIVED", None),
                    key=a.row["subject"].encode(),
                    repeat_at=None,
                    issued_at=issued_at,
                    received_at=a.started_at,
                    headers=template,
                )
                for a in delivered
            ]
            await asyncio.gather(
                *await kafka.send_many(producer, self.topics.receipts(self.agency), messages)
            )
        given_up = [a for a in failed if a.final or now - a.row["queued_at"] >= endpoint.retry_window]
        gone = {id(a) for a in given_up}
        retried = [a for a in failed if id(a) not in gone]
        if given_up:
            await self._dead_letters(producer, [(self._as_read(a), self._why(a)) for a in given_up])
        retry_at = [now + timedelta(seconds=self.policy.delay(a.number)) for a in retried]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _LOG_ATTEMPTS,
                self.agency,
                [a.event_id for a in ended],
                [a.number for a in ended],
                [a.started_at for a in ended],
                [a.latency_ms for a in ended],
                [a.status_code for a in ended],
                [None if a.error is None else a.error[:500] for a in ended],
                [a.error is None for a in ended],
            )
            if delivered or given_up:
                await conn.execute(
                    _FINISH,
                    self.agency,
                    [a.event_id for a in delivered + given_up],
                    [a.number for a in delivered + given_up],
                    ["delivered"] * len(delivered) + ["dead"] * len(given_up),
                )
            if retried:
                await conn.execute(
                    _RETRY, self.agency, [a.event_id for a in retried], [a.number for a in retried], retry_at
                )
            if given_up:  # flagged overdue now rather than at the receipt deadline
                await conn.execute(
                    _FLAG_OVERDUE,
                    self.agency,
                    [a.event_id for a in given_up],
                    [a.row["queued_at"] for a in given_up],
                )
        for outcome, group in (("delivered", delivered), ("failed", retried), ("given_up", given_up)):
            if group:
                WEBHOOK_ATTEMPTS.labels(agency=self.agency, outcome=outcome).inc(len(group))
        if delivered:
            log.debug("webhooks_delivered", agency=self.agency, deliveries=len(delivered))
        for a, when in zip(retried, retry_at, strict=True):
            log.warning(
                "webhook_attempt_failed",
                agency=self.agency,
                event_id=str(a.event_id),
                attempt=a.number,
                error=a.error,
                retry_in_seconds=round((when - now).total_seconds(), 1),
                circuit=self.breaker.state,
            )
        for a in given_up:
            log.warning(
                "webhook_given_up",
                agency=self.agency,
                event_id=str(a.event_id),
                attempts=a.number,
                error=a.error,
            )

    @staticmethod
    def _why(attempt: Attempted) -> str:
        if attempt.final:
            return f"it cannot be sent as a webhook: {attempt.error}"
        return f"the webhook endpoint did not take it after {attempt.number} attempts (last: {attempt.error})"

    def _as_read(self, attempt: Attempted) -> ConsumerRecord[bytes, bytes]:
        """The message as it was read from the agency's topic (for its dead letter)."""
        row = attempt.row
        return ConsumerRecord(
            topic=self.topics.agency(self.agency),
            partition=row["source_partition"],
            offset=row["source_offset"],
            timestamp=0,
            timestamp_type=0,
            key=row["subject"].encode(),
            value=attempt.value,
            checksum=None,
            serialized_key_size=-1,
            serialized_value_size=-1,
            headers=[(name, text.encode()) for name, text in attempt.headers],
        )
