"""The receipt tracker: store every routing decision and delivery receipt in
PostgreSQL, where the status lookup reads them, and flag deliveries whose final
receipt is overdue.

A receipt is accepted only from the agency whose receipt topic it arrived on.
Each agency has a receipt deadline (``agency_receipt_deadline``, else
``TUO_RECEIPT_DEADLINE_MINUTES``): a delivery without an ``APPLIED`` or
``REJECTED`` receipt by then is flagged in ``receipt_overdue`` (once), logged,
and counted by the ``/metrics`` endpoint; ``tuo receipts redeliver`` sends it again.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord

from router import audit
from router.consent_changes import reask_missed
from runtime import kafka
from runtime.access import Principal
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.metrics import DEAD_LETTERS, LAG, RECEIPT_LATENCY, RECEIPTS_STORED
from runtime.settings import Settings
from schemas import UndecodableMessage, decode
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader

log = structlog.get_logger(__name__)
COMPONENT = "receipt-tracker"


class UntrustedReceipt(ValueError):
    """A receipt whose content does not match the topic it came from."""


@dataclass
class StoredTally:
    """What one batch stored, for the metrics: counted once its transaction commits."""

    receipts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (agency, outcome)
    # Deliveries whose decision and final receipt are both stored now, the later of the
    # two in this batch: each one's receipt latency is observed exactly once.
    settled: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    latencies: list[tuple[str, float]] = field(default_factory=list)  # (agency, seconds)

    def merge(self, other: StoredTally) -> None:
        self.receipts.update(other.receipts)
        self.settled |= other.settled

    def count(self) -> None:
        for (agency, outcome), n in self.receipts.items():
            RECEIPTS_STORED.labels(agency=agency, outcome=outcome.lower()).inc(n)
        for agency, seconds in self.latencies:
            # Clocks differ (the database's decided_at, the agency's issued_at): never below 0.
            RECEIPT_LATENCY.labels(agency=agency).observe(max(0.0, seconds))


FINAL_OUTCOMES = ("APPLIED", "REJECTED")
# The first sweep after start looks this far back; later sweeps look at what fell due
# since the previous one, with an overlap for decisions the tracker stored late.
OVERDUE_LOOKBACK = timedelta(days=30)
SWEEP_OVERLAP = timedelta(hours=1)
MAX_REASON = 500


def _clean_reason(reason: str | None) -> str | None:
    """An agency's words as registrars will see them: printable, and not a novel."""
    if reason is None:
        return None
    return "".join(c if c.isprintable() else " " for c in reason)[:MAX_REASON]


async def flag_overdue(
    conn: asyncpg.Connection, default_deadline: timedelta, since: datetime
) -> tuple[list[tuple[str, str]], datetime]:
    """Flag every delivery that fell due after ``since`` without a final receipt; clear
    flags whose receipt has been stored meanwhile. Returns the (event id, agency)
    pairs flagged now, and the time to pass as ``since`` next time.

    Deliveries are grouped by deadline (agencies with their own, and the rest), so
    each query is a range on ``decided_at`` that the partial index serves."""
    now: datetime = await conn.fetchval("SELECT now()")
    overrides = await conn.fetch("SELECT agency, deadline FROM agency_receipt_deadline")
    by_deadline: dict[timedelta, list[str]] = {}
    for row in overrides:
        by_deadline.setdefault(row["deadline"], []).append(row["agency"])
    groups = [(deadline, agencies, True) for deadline, agencies in by_deadline.items()]
    groups.append((default_deadline, [r["agency"] for r in overrides], False))
    flagged: list[tuple[str, str]] = []
    for deadline, agencies, listed in groups:
        rows = await conn.fetch(
            "INSERT INTO receipt_overdue (event_id, agency, delivered_at, due_at)"
            " SELECT d.event_id, d.agency, d.decided_at, d.decided_at + $1::interval"
            "   FROM routing_decision d"
            "  WHERE d.outcome = 'DELIVERED'"
            "    AND d.decided_at > $2::timestamptz - $1::interval"
            "    AND d.decided_at <= $3::timestamptz - $1::interval"
            "    AND (d.agency = ANY($4::text[])) = $5"
            "    AND NOT EXISTS (SELECT 1 FROM delivery_receipt r WHERE r.event_id = d.event_id"
            "                    AND r.agency = d.agency AND r.outcome = ANY($6::text[]))"
            " ON CONFLICT DO NOTHING RETURNING event_id, agency",
            deadline,
            since,
            now,
            agencies,
            listed,
            list(FINAL_OUTCOMES),
        )
        flagged += [(str(r["event_id"]), r["agency"]) for r in rows]
    # A receipt stored while this sweep ran (in a transaction it could not see yet)
    # clears its flag here at the latest.
    await conn.execute(
        "UPDATE receipt_overdue o SET receipted_at = r.issued_at FROM delivery_receipt r"
        " WHERE o.receipted_at IS NULL AND r.event_id = o.event_id AND r.agency = o.agency"
        "   AND r.outcome = ANY($1::text[])",
        list(FINAL_OUTCOMES),
    )
    return flagged, now - SWEEP_OVERLAP


async def watch_deadlines(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    default_deadline = timedelta(minutes=settings.receipt_deadline_minutes)
    since = datetime.now(UTC) - OVERDUE_LOOKBACK
    while not stop.is_set():
        async with pool.acquire() as conn:
            flagged, since = await flag_overdue(conn, default_deadline, since)
        for event_id, agency in flagged:
            log.warning("receipt_overdue", event_id=event_id, agency=agency)
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.overdue_check_seconds)
        except TimeoutError:
            pass


async def set_deadline(pool: asyncpg.Pool, agency: str, deadline: timedelta) -> bool:
    """Give a subscribed agency its own receipt deadline; False if no subscription names it."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM subscription WHERE agency = $1 LIMIT 1", agency):
            return False
        await conn.execute(
            "INSERT INTO agency_receipt_deadline (agency, deadline) VALUES ($1, $2)"
            " ON CONFLICT (agency) DO UPDATE SET deadline = EXCLUDED.deadline",
            agency,
            deadline,
        )
    return True


async def overdue_deliveries(pool: asyncpg.Pool, agency: str | None = None) -> list[asyncpg.Record]:
    """Open overdue flags (of one agency, or all), with the event's reference and the
    latest receipt, if any (a RECEIVED one, since a final receipt clears the flag)."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT o.agency, i.reference, o.event_id, o.delivered_at, o.due_at,"
        "       (SELECT max(r.outcome) FROM delivery_receipt r"
        "         WHERE r.event_id = o.event_id AND r.agency = o.agency) AS receipt"
        "  FROM receipt_overdue o JOIN intake_record i ON i.event_id = o.event_id"
        " WHERE o.receipted_at IS NULL AND ($1::text IS NULL OR o.agency = $1)"
        " ORDER BY o.agency, o.due_at",
        agency,
    )
    return rows


async def _chain(conn: asyncpg.Connection, decisions: list[audit.Decision], tally: StoredTally) -> None:
    """Append decisions to the audit chain; deliveries new to it are noted in ``tally``."""
    delivered = [(uuid.UUID(d.event_id), d.agency) for d in decisions if d.outcome == "DELIVERED"]
    if delivered:
        rows = await conn.fetch(
            "SELECT k.event_id, k.agency FROM unnest($1::uuid[], $2::text[]) AS k(event_id, agency)"
            " WHERE NOT EXISTS (SELECT 1 FROM routing_decision d"
            "                    WHERE d.event_id = k.event_id AND d.agency = k.agency)",
            [e for e, _ in delivered],
            [a for _, a in delivered],
        )
        tally.settled |= {(r["event_id"], r["agency"]) for r in rows}
    await audit.append_many(conn, decisions)
    # A delivery under consent stored after a withdrawal was answered "not held".
    await reask_missed(
        conn,
        [
            (d.event_id, d.agency, d.decided_at)
            for d in decisions
            if d.outcome == "DELIVERED" and d.legal_basis == "consent"
        ],
    )
    for decision in decisions:
        log.debug(
            "decision_stored", event_id=decision.event_id, agency=decision.agency, outcome=decision.outcome
        )


async def _receipt_latencies(
    conn: asyncpg.Connection, pairs: set[tuple[uuid.UUID, str]]
) -> list[tuple[str, float]]:
    """Seconds from each delivery's routing decision to its final receipt, where both are stored."""
    if not pairs:
        return []
    rows = await conn.fetch(
        "SELECT k.agency, extract(epoch FROM min(r.issued_at) - min(d.decided_at))::float8 AS seconds"
        "  FROM unnest($1::uuid[], $2::text[]) AS k(event_id, agency)"
        "  JOIN routing_decision d ON d.event_id = k.event_id AND d.agency = k.agency"
        "   AND d.outcome = 'DELIVERED'"
        "  JOIN delivery_receipt r ON r.event_id = k.event_id AND r.agency = k.agency"
        "   AND r.outcome = ANY($3::text[])"
        " GROUP BY k.event_id, k.agency",
        [e for e, _ in pairs],
        [a for _, a in pairs],
        list(FINAL_OUTCOMES),
    )
    return [(r["agency"], r["seconds"]) for r in rows]


def _event_id(record: ConsumerRecord[bytes, bytes]) -> str | None:
    """The event a decision or receipt is about: its ce_id is ``<event id>/<agency>[/...]``."""
    ce_id = next((bytes(v).decode(errors="replace") for k, v in record.headers if k == "ce_id"), None)
    return ce_id.split("/", 1)[0] if ce_id else None


@dataclass
class ArrivedBatch:
    """A batch as read: its routing decisions, receipts and duplicates' receipts as rows
    to store, and the records refused, with why."""

    decisions: list[audit.Decision] = field(default_factory=list)
    receipts: list[tuple[Any, str, str, str | None, datetime, datetime | None]] = field(default_factory=list)
    duplicates: list[tuple[str, Any, str, str, datetime]] = field(default_factory=list)
    refused: list[tuple[ConsumerRecord[bytes, bytes], str]] = field(default_factory=list)


def _read(topics: Topics, records: list[ConsumerRecord[bytes, bytes]]) -> ArrivedBatch:
    """Decode and check every record of a batch, before any SQL: a record that is not a
    decision, or a receipt from the agency whose topic it came from, is refused."""
    batch = ArrivedBatch()
    for record in records:
        try:
            subject, body = decode(record.value or b"")
            if record.topic == topics.routing_decisions:
                if subject != "RoutingDecision":
                    raise UntrustedReceipt(f"{subject} on the routing decisions topic")
                batch.decisions.append(audit.Decision.of(body))
                continue
            agency = topics.agency_from_receipts_topic(record.topic)
            if subject != "DeliveryReceipt":
                raise UntrustedReceipt(f"{subject} on {record.topic}")
            if body["agency"] != agency:
                raise UntrustedReceipt(f"receipt names agency {body['agency']!r} but came from {agency!r}")
            if body.get("duplicate"):
                receipt_id = CloudEvent.from_headers(record.headers).id
                batch.duplicates.append(
                    (receipt_id, body["event_id"], agency, body["outcome"], body["issued_at"])
                )
            else:
                batch.receipts.append(
                    (
                        body["event_id"],
                        agency,
                        body["outcome"],
                        _clean_reason(body["reason"]),
                        body["issued_at"],
                        body.get("received_at"),
                    )
                )
        except (UndecodableMessage, UntrustedReceipt, MissingCloudEventHeader, KeyError) as exc:
            batch.refused.append((record, str(exc)))
    return batch


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


async def _store_rows(conn: asyncpg.Connection, batch: ArrivedBatch, tally: StoredTally) -> None:
    """A statement per kind of row: duplicates' receipts, receipts, overdue flags cleared,
    and the decisions appended to the chain (one lock, one look-up, one pipelined append)."""
    if batch.duplicates:
        await conn.execute(
            "INSERT INTO receipt_duplicate (receipt_id, event_id, agency, outcome, issued_at)"
            " SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[])"
            " ON CONFLICT DO NOTHING",
            *_columns(batch.duplicates, 5),
        )
    if batch.receipts:
        stored = await conn.fetch(
            "INSERT INTO delivery_receipt (event_id, agency, outcome, reason, issued_at, received_at)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],"
            "                      $6::timestamptz[])"
            " ON CONFLICT DO NOTHING RETURNING event_id, agency, outcome",
            *_columns(batch.receipts, 6),
        )
        for row in stored:
            log.debug(
                "receipt_stored", event_id=str(row["event_id"]), agency=row["agency"], outcome=row["outcome"]
            )
            tally.receipts[(row["agency"], row["outcome"])] += 1
            if row["outcome"] in FINAL_OUTCOMES:
                tally.settled.add((row["event_id"], row["agency"]))
        final = [r for r in batch.receipts if r[2] in FINAL_OUTCOMES]
        if final:
            await conn.execute(
                "UPDATE receipt_overdue o SET receipted_at = f.issued_at"
                "  FROM unnest($1::uuid[], $2::text[], $3::timestamptz[])"
                "       AS f(event_id, agency, issued_at)"
                " WHERE o.event_id = f.event_id AND o.agency = f.agency AND o.receipted_at IS NULL",
                [r[0] for r in final],
                [r[1] for r in final],
                [r[4] for r in final],
            )
    await _chain(conn, batch.decisions, tally)


async def _store_all(
    conn: asyncpg.Connection, topics: Topics, records: list[ConsumerRecord[bytes, bytes]]
) -> tuple[list[tuple[ConsumerRecord[bytes, bytes], str]], StoredTally]:
    """Store a whole poll batch, from every partition, in one transaction; return the
    records refused, with why, and what was stored."""
    batch = _read(topics, records)
    tally = StoredTally()
    async with conn.transaction():
        await _store_rows(conn, batch, tally)
        tally.latencies = await _receipt_latencies(conn, tally.settled)
    return batch.refused, tally


async def store_receipt(
    pool: asyncpg.Pool,
    *,
    event_id: uuid.UUID,
    agency: str,
    outcome: str,
    reason: str | None,
    issued_at: datetime,
    received_at: datetime | None,
) -> bool:
    """Store a receipt that came over HTTPS (``consumers.agency_api``) exactly as one from
    the agency's receipt topic is stored: the same row, the same de-duplication, the overdue
    flag cleared and the latency observed. False: the agency had sent this receipt before."""
    batch = ArrivedBatch(
        receipts=[(event_id, agency, outcome, _clean_reason(reason), issued_at, received_at)]
    )
    tally = StoredTally()
    async with pool.acquire() as conn, conn.transaction():
        await _store_rows(conn, batch, tally)
        tally.latencies = await _receipt_latencies(conn, tally.settled)
    tally.count()
    return bool(tally.receipts)


async def _store_one_by_one(
    conn: asyncpg.Connection, topics: Topics, records: list[ConsumerRecord[bytes, bytes]]
) -> tuple[list[tuple[ConsumerRecord[bytes, bytes], str]], StoredTally]:
    """Store a batch the database refused in one transaction, each record in its own
    savepoint, so that a value the database refuses costs only that record. Returns the
    records refused, with why, and what was stored."""
    refused: list[tuple[ConsumerRecord[bytes, bytes], str]] = []
    tally = StoredTally()
    async with conn.transaction():
        for record in records:
            with structlog.contextvars.bound_contextvars(event_id=_event_id(record)):
                one = _read(topics, [record])
                refused += one.refused
                mine = StoredTally()  # kept only if its savepoint is
                try:
                    async with conn.transaction():
                        await _store_rows(conn, one, mine)
                    tally.merge(mine)
                except asyncpg.DataError as exc:
                    refused.append((record, f"the database refused it: {type(exc).__name__}"))
        tally.latencies = await _receipt_latencies(conn, tally.settled)
    return refused, tally


MAX_BATCH = 2000  # records per poll, from all partitions: one transaction


async def _dead_letter(
    producer: kafka.AIOKafkaProducer, topics: Topics, refused: list[tuple[ConsumerRecord[bytes, bytes], str]]
) -> None:
    letters = [dead_letter(record, COMPONENT, reason) for record, reason in refused]
    await asyncio.gather(
        *await kafka.send_many(producer, topics.dead_letters, [(d.key, d.value, d.headers) for d in letters])
    )
    DEAD_LETTERS.labels(component=COMPONENT).inc(len(refused))
    for record, reason in refused:
        log.warning(
            "receipt_dead_lettered",
            event_id=_event_id(record),
            topic=record.topic,
            offset=record.offset,
            reason=reason,
        )


async def run_tracker(settings: Settings, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    topics = Topics(settings.topic_prefix)
    group_id = f"{settings.topic_prefix}.receipt-tracker"
    pattern = f"(?:{topics.receipts_pattern()})|^{re.escape(topics.routing_decisions)}$"
    consumer = kafka.consumer(
        settings,
        principal=Principal.TRACKER,
        group_id=group_id,
        client_id="tuo-receipt-tracker",
        role="tracker",
        metadata_max_age_ms=5000,
    )
    consumer.subscribe(pattern=pattern)
    dead_letters = kafka.producer(
        settings, principal=Principal.TRACKER, client_id="tuo-receipt-tracker", role="tracker"
    )
    deadlines: asyncio.Task[None] | None = None
    LAG.watch(group_id, consumer)
    try:
        await dead_letters.start()
        async with pool.acquire() as conn:
            sealed = await audit.seal_unsealed(conn)
        if sealed:
            log.info("decision_chain_sealed", rows=sealed)
        await consumer.start()
        log.info("receipt_tracker_started", group_id=group_id)
        deadlines = asyncio.create_task(watch_deadlines(settings, pool, stop))
        while not stop.is_set():
            if deadlines.done():
                deadlines.result()  # a failed sweep restarts the tracker (see operators.services)
            polled = await consumer.getmany(timeout_ms=500, max_records=MAX_BATCH)
            records = [record for batch in polled.values() for record in batch]
            if not records:
                continue
            async with pool.acquire() as conn:
                try:  # every partition's records at once
                    refused, stored = await _store_all(conn, topics, records)
                except asyncpg.DataError:  # find the one record at fault, keep the rest
                    refused, stored = await _store_one_by_one(conn, topics, records)
            stored.count()  # committed
            if refused:
                await _dead_letter(dead_letters, topics, refused)
            await consumer.commit({tp: batch[-1].offset + 1 for tp, batch in polled.items() if batch})
    finally:
        LAG.forget(consumer)
        if deadlines is not None:
            deadlines.cancel()
            # Settle the sweep without raising what it failed with (the loop raised that
            # already): awaiting it would skip stopping the consumer, which would then stay
            # in the group holding its partitions, unread, while the restarted tracker waits.
            await asyncio.wait({deadlines})
            if not deadlines.cancelled() and (failure := deadlines.exception()) is not None:
                log.warning("overdue_sweep_failed", error=type(failure).__name__)
        try:
            await consumer.stop()
        finally:
            await dead_letters.stop()
