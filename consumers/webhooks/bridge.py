"""The webhook bridge: an agency's Kafka consumer, run by the bus for an agency that
cannot run one, which POSTs each message to the agency's HTTPS endpoint.

It works in two halves, joined by ``webhook_delivery`` in PostgreSQL (retries that
survive a restart, as Open Notificaties keeps them):

- **Queueing.** It reads the agency's topic (read_committed, in the agency's own
  consumer group, as the agency's principal) a poll batch at a time, queues the batch
  in one statement (one row per event id: a copy already queued is not queued again,
  one given up on is queued afresh), and only then commits the offsets.
- **Delivering.** It POSTs the first pending delivery of each subject, at most the
  endpoint's ``max_in_flight`` at once, so one person's events arrive in order. Every
  attempt is logged (time, latency, status code or error). A 2xx answer is the agency's
  receipt that it has the event: a ``RECEIVED`` receipt goes to the agency's receipt
  topic, and the sealed copy of the event is dropped. Any other answer, a timeout or a
  refused connection is tried again after an exponential backoff with jitter, until
  the endpoint's retry window (24 hours by default) has passed since the event was
  queued; then it is given up on: the message goes to the agency's dead letters
  (``tuo dlq``, ``tuo receipts redeliver``) and its receipt is flagged overdue at once.
  An endpoint that keeps failing trips a circuit breaker: it is left alone for a
  while, then tried with one delivery.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import structlog
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
MAX_ERROR = 200

_QUEUE = (
    "INSERT INTO webhook_delivery"
    " (agency, event_id, event_type, subject, headers, value, source_partition, source_offset)"
    " SELECT $1, q.event_id, q.event_type, q.subject, q.headers, q.value, q.part, q.off"
    "   FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::bytea[], $7::int[], $8::bigint[])"
    "     AS q(event_id, event_type, subject, headers, value, part, off)"
    " ON CONFLICT (agency, event_id) DO UPDATE SET status = 'pending', attempts = 0,"
    "   next_attempt_at = now(), finished_at = NULL, queued_at = now(), value = EXCLUDED.value,"
    "   headers = EXCLUDED.headers, source_partition = EXCLUDED.source_partition,"
    "   source_offset = EXCLUDED.source_offset,"
    "   seq = nextval(pg_get_serial_sequence('webhook_delivery', 'seq'))"
    " WHERE webhook_delivery.status = 'dead'"
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
_LOG_ATTEMPT = (
    "INSERT INTO webhook_attempt"
    " (agency, event_id, attempt, started_at, latency_ms, status_code, error, succeeded)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)


def _sealed_for(agency: str, event_id: uuid.UUID) -> bytes:
    return f"webhook:{agency}:{event_id}".encode()


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
                await asyncio.gather(
                    self._queue_from(consumer, producer, stop), self._deliver(client, producer, stop)
                )
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
            await consumer.commit({tp: batch[-1].offset + 1 for tp, batch in polled.items() if batch})
            self._queued.set()

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
                    json.dumps(headers),
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
        in_flight: dict[str, asyncio.Task[None]] = {}  # subject → its delivery being attempted
        try:
            while not stop.is_set():
                endpoint = await endpoint_of(self.pool, self.sealer, self.agency)
                if endpoint is None:
                    raise NoWebhookEndpoint(self.agency)
                room = endpoint.max_in_flight - len(in_flight)
                allowed = self.breaker.allows(time.monotonic())
                if allowed is not None:
                    room = min(room, allowed - len(in_flight))
                if room > 0:
                    for row in await self.pool.fetch(_DUE, self.agency, list(in_flight), room):
                        task = asyncio.create_task(self._attempt(client, producer, endpoint, row))
                        in_flight[row["subject"]] = task
                self._queued.clear()
                woken = asyncio.create_task(self._queued.wait())
                stopping = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait(
                        [woken, stopping, *in_flight.values()],
                        timeout=IDLE_POLL_SECONDS,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
                    stopping.cancel()
                for subject, task in list(in_flight.items()):
                    if task.done():
                        del in_flight[subject]
                        task.result()  # an attempt that could not even be recorded stops the bridge
        finally:
            if in_flight:  # each ends within the attempt's timeout
                await asyncio.gather(*in_flight.values(), return_exceptions=True)

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        producer: kafka.AIOKafkaProducer,
        endpoint: Endpoint,
        row: asyncpg.Record,
    ) -> None:
        event_id: uuid.UUID = row["event_id"]
        attempt = row["attempts"] + 1
        value = self.sealer.open(row["value"], _sealed_for(self.agency, event_id))
        forwarded = [(name, text) for name, text in json.loads(row["headers"])]
        started_at = datetime.now(UTC)
        began = time.monotonic()
        status_code: int | None = None
        try:
            body, content_type = requests.body(value, endpoint.payload_format)
        except NotDeliverable as exc:
            await self._give_up(producer, row, value, attempt, started_at, 0, None, str(exc))
            return
        headers = requests.http_headers(
            forwarded,
            content_type=content_type,
            webhook_id=str(event_id),
            body=body,
            secrets=endpoint.secrets,
            now=started_at,
        )
        try:
            async with client.stream("POST", endpoint.url, content=body, headers=headers) as answer:
                status_code = answer.status_code  # the body is never read: it could be anything
            error = None if 200 <= status_code < 300 else f"answered HTTP {status_code}"
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {str(exc)[:MAX_ERROR]}" if str(exc) else type(exc).__name__
        latency_ms = round((time.monotonic() - began) * 1000)
        if error is None:
            self.breaker.succeeded()
            await self._delivered(producer, row, attempt, started_at, latency_ms, status_code)
            return
        self.breaker.failed(time.monotonic())
        now = datetime.now(UTC)
        if now - row["queued_at"] >= endpoint.retry_window:
            await self._give_up(producer, row, value, attempt, started_at, latency_ms, status_code, error)
            return
        retry_at = now + timedelta(seconds=self.policy.delay(attempt))
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _LOG_ATTEMPT,
                self.agency,
                event_id,
                attempt,
                started_at,
                latency_ms,
                status_code,
                error,
                False,
            )
            await conn.execute(
                "UPDATE webhook_delivery SET attempts = $3, next_attempt_at = $4"
                " WHERE agency = $1 AND event_id = $2",
                self.agency,
                event_id,
                attempt,
                retry_at,
            )
        WEBHOOK_ATTEMPTS.labels(agency=self.agency, outcome="failed").inc()
        log.warning(
            "webhook_attempt_failed",
            agency=self.agency,
            event_id=str(event_id),
            attempt=attempt,
            error=error,
            retry_in_seconds=round((retry_at - now).total_seconds(), 1),
            circuit=self.breaker.state,
        )

    async def _delivered(
        self,
        producer: kafka.AIOKafkaProducer,
        row: asyncpg.Record,
        attempt: int,
        started_at: datetime,
        latency_ms: int,
        status_code: int | None,
    ) -> None:
        """The endpoint has the event: its RECEIVED receipt first (should that fail, the
        event is POSTed again, and the endpoint knows it by its webhook-id), then the log."""
        event_id: uuid.UUID = row["event_id"]
        issued_at = datetime.now(UTC)
        message = self.receipts.message(
            Receipt(str(event_id), "RECEIVED", None),
            key=row["subject"].encode(),
            repeat_at=None,
            issued_at=issued_at,
            received_at=started_at,
            headers=self.receipts.headers(issued_at),
        )
        await asyncio.gather(*await kafka.send_many(producer, self.topics.receipts(self.agency), [message]))
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _LOG_ATTEMPT, self.agency, event_id, attempt, started_at, latency_ms, status_code, None, True
            )
            await conn.execute(
                "UPDATE webhook_delivery SET status = 'delivered', attempts = $3, finished_at = now(),"
                " value = NULL WHERE agency = $1 AND event_id = $2",
                self.agency,
                event_id,
                attempt,
            )
        WEBHOOK_ATTEMPTS.labels(agency=self.agency, outcome="delivered").inc()
        log.info("webhook_delivered", agency=self.agency, event_id=str(event_id), attempt=attempt)

    async def _give_up(
        self,
        producer: kafka.AIOKafkaProducer,
        row: asyncpg.Record,
        value: bytes,
        attempt: int,
        started_at: datetime,
        latency_ms: int,
        status_code: int | None,
        error: str,
    ) -> None:
        """No more attempts: the message to the agency's dead letters, as it was read, and
        its receipt flagged overdue now rather than at its deadline."""
        event_id: uuid.UUID = row["event_id"]
        record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
            topic=self.topics.agency(self.agency),
            partition=row["source_partition"],
            offset=row["source_offset"],
            timestamp=0,
            timestamp_type=0,
            key=row["subject"].encode(),
            value=value,
            checksum=None,
            serialized_key_size=-1,
            serialized_value_size=-1,
            headers=[(name, text.encode()) for name, text in json.loads(row["headers"])],
        )
        reason = f"the webhook endpoint did not take it after {attempt} attempts (last: {error})"
        await self._dead_letters(producer, [(record, reason)])
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _LOG_ATTEMPT,
                self.agency,
                event_id,
                attempt,
                started_at,
                latency_ms,
                status_code,
                error[:500],
                False,
            )
            await conn.execute(
                "UPDATE webhook_delivery SET status = 'dead', attempts = $3, finished_at = now(),"
                " value = NULL"
                " WHERE agency = $1 AND event_id = $2",
                self.agency,
                event_id,
                attempt,
            )
            await conn.execute(
                "INSERT INTO receipt_overdue (event_id, agency, delivered_at, due_at)"
                " VALUES ($1, $2, $3, now()) ON CONFLICT DO NOTHING",
                event_id,
                self.agency,
                row["queued_at"],
            )
        WEBHOOK_ATTEMPTS.labels(agency=self.agency, outcome="given_up").inc()
        log.warning(
            "webhook_given_up", agency=self.agency, event_id=str(event_id), attempts=attempt, error=error
        )
