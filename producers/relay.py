"""The outbox relay: publish committed outbox rows to Kafka exactly once, in id order.

Each batch goes through three steps:

1. *claim*: one short PostgreSQL transaction stamps the oldest unpublished rows
   with a new batch number (``outbox.relay_batch``);
2. one Kafka transaction carries the rows and, as the committed offset of the
   relay's ledger group, the batch number: Kafka records which batch last reached
   the topic atomically with the messages themselves;
3. the rows are marked ``published_at`` (the commit is decided; read_committed
   readers see the batch a moment later, once the broker has written its markers).

A crash or a broker failure between steps 2 and 3 leaves claimed rows unmarked.
Before it claims anything, a relay starts its transactional producer (one stable
transactional id), which fences any earlier incarnation and settles that one's last
transaction, and then reads the ledger: claimed rows of batches up to the ledger's
reached the topic and are marked, the others are released and sent again. So
killing the relay or restarting the broker neither loses nor repeats an event.

One relay works at a time: it holds a PostgreSQL advisory lock on the connection it
does all its work on, and other relays wait as standbys. Rows are published in id
order, so one subject's events stay in order.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from uuid import UUID

import asyncpg
import structlog
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from runtime import kafka
from runtime.access import Principal
from runtime.metrics import EVENTS_PUBLISHED
from runtime.outbox import CHANNEL as OUTBOX_CHANNEL
from runtime.sealing import PayloadSealer
from runtime.settings import Settings

log = structlog.get_logger(__name__)

BATCH_SIZE = 500
IDLE_POLL_SECONDS = 1.0
STANDBY_POLL_SECONDS = 0.5
RETRY_BACKOFF_SECONDS = (0.2, 0.5, 1, 2, 5)
# The broker forgets a group's offsets offsets.retention.minutes (7 days by default)
# after their last commit, so an idle relay writes its ledger again now and then.
LEDGER_REFRESH_SECONDS = 3600.0
LEDGER_NOTE = "outbox relay ledger: the offset is the last batch committed, not a position"
# Any fixed number shared by every relay of a database, and used for nothing else
# (migrations hold 0x7475_6F00, the routing-decision chain 0x7475_6F01).
RELAY_LOCK = 0x7475_6F52


@dataclass(frozen=True)
class OutboxRow:
    id: int
    event_id: UUID
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class LedgerUnreadable(RuntimeError):
    """The group coordinator did not answer for the ledger (it may still be loading); retry."""


class LedgerLost(RuntimeError):
    """Rows are claimed by a batch, but Kafka no longer has the ledger to say whether
    that batch reached the topic."""

    def __init__(self, batches: list[int], group: str) -> None:
        super().__init__(
            f"outbox rows of relay batch(es) {batches} were claimed, but consumer group {group!r} has "
            "no ledger offset (the broker expires offsets after offsets.retention.minutes, and "
            "re-creating the topic deletes them), so whether they reached the topic is unknown. "
            "Look up their event ids (SELECT event_id FROM outbox WHERE published_at IS NULL AND "
            "relay_batch IS NOT NULL) on the topic's ce_id headers; set published_at = now() on the "
            "rows found there and relay_batch = NULL on the others, then restart the relay."
        )
        self.batches = batches


class UnsettledClaim(RuntimeError):
    """The oldest unpublished rows are still claimed: their batch was never settled."""

    def __init__(self, batches: list[int]) -> None:
        super().__init__(
            f"outbox rows are still claimed by relay batch(es) {batches}; is a relay without the "
            f"advisory lock {RELAY_LOCK:#x} running? The relay settles them when it restarts."
        )


# Queries. Each relay runs them on the one connection that holds RELAY_LOCK.


async def claim_batch(conn: asyncpg.Connection, limit: int) -> tuple[int, list[OutboxRow]] | None:
    """Stamp the oldest unpublished rows with a new batch number, in one transaction."""
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT id, event_id, topic, message_key, message_value, headers, relay_batch FROM outbox"
            " WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE",
            limit,
        )
        if not rows:
            return None
        unsettled = sorted({r["relay_batch"] for r in rows if r["relay_batch"] is not None})
        if unsettled:
            raise UnsettledClaim(unsettled)
        batch: int = await conn.fetchval("SELECT nextval('outbox_relay_batch')")
        await conn.execute(
            "UPDATE outbox SET relay_batch = $1 WHERE id = ANY($2::bigint[])",
            batch,
            [r["id"] for r in rows],
        )
    return batch, [
        OutboxRow(
            id=r["id"],
            event_id=r["event_id"],
            topic=r["topic"],
            key=r["message_key"],
            value=r["message_value"],
            headers=[(k, v.encode()) for k, v in json.loads(r["headers"])],
        )
        for r in rows
    ]


async def mark_published(conn: asyncpg.Connection, ids: list[int]) -> None:
    await conn.execute(
        "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[]) AND published_at IS NULL",
        ids,
    )


async def claimed_batches(conn: asyncpg.Connection) -> list[int]:
    """Batches whose rows are claimed but not marked published."""
    rows = await conn.fetch(
        "SELECT DISTINCT relay_batch FROM outbox"
        " WHERE published_at IS NULL AND relay_batch IS NOT NULL ORDER BY relay_batch"
    )
    return [r["relay_batch"] for r in rows]


async def last_published_batch(conn: asyncpg.Connection) -> int | None:
    batch: int | None = await conn.fetchval(
        "SELECT max(relay_batch) FROM outbox WHERE published_at IS NOT NULL"
    )
    return batch


async def settle_claims(conn: asyncpg.Connection, ledger: int) -> tuple[int, int]:
    """Mark claimed rows of batches up to ``ledger`` published and release the rest;
    return (rows marked, rows released)."""
    async with conn.transaction():
        marked = await conn.execute(
            "UPDATE outbox SET published_at = now()"
            " WHERE published_at IS NULL AND relay_batch IS NOT NULL AND relay_batch <= $1",
            ledger,
        )
        released = await conn.execute(
            "UPDATE outbox SET relay_batch = NULL"
            " WHERE published_at IS NULL AND relay_batch IS NOT NULL AND relay_batch > $1",
            ledger,
        )
    return int(marked.split()[-1]), int(released.split()[-1])


class OutboxRelay:
    """The relay's transactional id and ledger group are both ``<prefix>.relay``; the
    ledger offset is kept on partition 0 of the life-events topic (offsets can only be
    committed for a partition that exists)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.sealer = PayloadSealer.from_settings(settings)  # outbox payloads are sealed at rest
        self.transactional_id = f"{settings.topic_prefix}.relay"
        self.ledger_group = f"{settings.topic_prefix}.relay"
        self.ledger_partition = TopicPartition(kafka.Topics(settings.topic_prefix).relay_ledger, 0)
        self.ledger: int | None = None  # the last batch known to be committed
        self.ledger_written_at: float | None = None  # monotonic; None: not by this process
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        # The lock is held by this connection's session: if the connection dies, another
        # relay may take over, and this one can no longer claim anything. Releasing the
        # connection to the pool unlocks it (asyncpg's reset runs pg_advisory_unlock_all).
        async with self.pool.acquire() as conn:
            if not await self._take_lock(conn, stop):
                return
            await conn.add_listener(OUTBOX_CHANNEL, self._on_notify)
            try:
                await self._relay(conn, stop)
            finally:
                if not conn.is_closed():
                    await conn.remove_listener(OUTBOX_CHANNEL, self._on_notify)

    def _on_notify(self, *_: object) -> None:
        self.wake.set()

    async def _take_lock(self, conn: asyncpg.Connection, stop: asyncio.Event) -> bool:
        waiting = False
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
            if not waiting:
                log.info("relay_standby", reason="another relay holds the outbox")
                waiting = True
            if await _stopped(stop, STANDBY_POLL_SECONDS):
                return False
        return True

    async def _relay(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        producer: kafka.AIOKafkaProducer | None = None
        failures = 0
        try:
            while not stop.is_set():
                try:
                    if producer is None:
                        producer = await self._fresh_producer()
                        await self._recover(conn, producer)
                        log.info("relay_ready", ledger=self.ledger)
                    self.wake.clear()  # before reading, so a notify during the read is not lost
                    published = await self.publish_batch(conn, producer)
                    if not published:
                        await self._refresh_ledger(producer)
                    failures = 0
                except (KafkaError, LedgerUnreadable) as exc:
                    # A transactional producer is not reusable after most errors: start a new
                    # one, which aborts whatever this one left open, and settle the claims again.
                    log.warning("relay_kafka_failed", error=type(exc).__name__, detail=str(exc))
                    if producer is not None:
                        await _discard(producer)
                        producer = None
                    delay = RETRY_BACKOFF_SECONDS[min(failures, len(RETRY_BACKOFF_SECONDS) - 1)]
                    failures += 1
                    await _stopped(stop, delay)
                    continue
                if not published:
                    await self._idle(stop)
        finally:
            if producer is not None:
                await producer.stop()

    async def _fresh_producer(self) -> kafka.AIOKafkaProducer:
        producer = kafka.producer(
            self.settings,
            principal=Principal.RELAY,
            client_id="tuo-relay",
            role="relay",
            transactional_id=self.transactional_id,
        )
        try:
            await producer.start()  # InitProducerId: fences the previous relay and settles its transaction
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def publish_batch(self, conn: asyncpg.Connection, producer: kafka.AIOKafkaProducer) -> int:
        """Claim, send and mark one batch; return how many rows were published."""
        claimed = await claim_batch(conn, BATCH_SIZE)
        if claimed is None:
            return 0
        batch, rows = claimed
        async with producer.transaction():
            futures = [
                await producer.send(
                    row.topic,
                    value=self.sealer.open(row.value, row.event_id),
                    key=row.key,
                    headers=row.headers,
                )
                for row in rows
            ]
            await kafka.offsets_after_writes(
                producer, futures, {self.ledger_partition: (batch, LEDGER_NOTE)}, self.ledger_group
            )
        self._ledger_written(batch)
        EVENTS_PUBLISHED.inc(len(rows))
        await mark_published(conn, [row.id for row in rows])
        for row in rows:  # per event at DEBUG only: the batch line below is the one at INFO
            log.debug("event_published", event_id=str(row.event_id), batch=batch)
        log.info("outbox_published", batch=batch, count=len(rows), last_id=rows[-1].id)
        return len(rows)

    async def _recover(self, conn: asyncpg.Connection, producer: kafka.AIOKafkaProducer) -> None:
        """Settle the rows a previous relay (or this one, before a Kafka error) claimed.
        Runs after the producer has fenced its predecessor, so the ledger is final."""
        ledger = await self.read_ledger()
        batches = await claimed_batches(conn)
        if ledger is None:
            last = await last_published_batch(conn)
            if last is not None and batches:
                raise LedgerLost(batches, self.ledger_group)
            if last is not None:
                # The broker expired it while no relay ran; write it back before claiming,
                # so that a crash in the next batch can still be settled.
                await self._write_ledger(producer, last)
                log.warning("relay_ledger_restored", ledger=last)
            ledger = last
        marked, released = await settle_claims(conn, ledger or 0)
        self.ledger = ledger
        if batches:
            log.info("relay_claims_settled", batches=batches, ledger=ledger, marked=marked, released=released)

    async def read_ledger(self) -> int | None:
        """The last batch Kafka has recorded as committed; None if it has none."""
        client = kafka.admin(self.settings, principal=Principal.RELAY)
        await client.start()
        try:
            answer = await client.list_consumer_group_offsets(
                self.ledger_group, partitions=[self.ledger_partition]
            )
        finally:
            await client.close()
        if self.ledger_partition not in answer:
            # aiokafka drops a group-level error (coordinator loading, say) and answers
            # nothing: that is not the same as "no ledger".
            raise LedgerUnreadable(f"no answer for {self.ledger_group!r}")
        offset: int = answer[self.ledger_partition].offset
        return offset if offset >= 0 else None

    async def _write_ledger(self, producer: kafka.AIOKafkaProducer, batch: int) -> None:
        async with producer.transaction():
            await producer.send_offsets_to_transaction(
                {self.ledger_partition: (batch, LEDGER_NOTE)}, self.ledger_group
            )
        self._ledger_written(batch)

    def _ledger_written(self, batch: int) -> None:
        self.ledger = batch
        self.ledger_written_at = time.monotonic()

    async def _refresh_ledger(self, producer: kafka.AIOKafkaProducer) -> None:
        if self.ledger is None:
            return
        written = self.ledger_written_at
        if written is None or time.monotonic() - written > LEDGER_REFRESH_SECONDS:
            await self._write_ledger(producer, self.ledger)
            log.info("relay_ledger_refreshed", ledger=self.ledger)

    async def _idle(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waiters, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def _discard(producer: kafka.AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except KafkaError as exc:
        log.warning("relay_producer_stop_failed", error=type(exc).__name__)


async def run_relay(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    await OutboxRelay(settings, pool).run(stop)
