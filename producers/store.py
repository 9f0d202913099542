"""Intake's queries: record an event with its outbox row in one transaction,
and read an event's status back by reference number."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

OUTBOX_CHANNEL = "tuo_outbox"


@dataclass(frozen=True)
class Recorded:
    reference: str
    event_id: UUID
    event_type: str
    created: bool  # False when an idempotent retry returned an earlier submission


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different submission."""


# Writes, in record_event's transaction, the signed news that the informant's refusal
# ended a consent given before: (connection, consent record id, agency, recorded at).
EndOfConsent = Callable[[asyncpg.Connection, int, str, datetime], Awaitable[object]]


@dataclass(frozen=True)
class NewEvent:
    reference: str
    event_id: UUID
    event_type: str
    subject_id: str
    registration_office: str
    recorded_by: str
    recorded_at: datetime
    idempotency_key: str | None
    request_fingerprint: str
    consents: list[tuple[str, str]]  # (agency, choice)
    topic: str
    message_key: bytes
    message_value: bytes
    headers: list[tuple[str, bytes]]
    follows_event_id: UUID | None = None  # the event a correction or void is about
    end_of_consent: EndOfConsent | None = None  # None: refusals are only recorded


@dataclass(frozen=True)
class StoredEvent:
    reference: str
    event_id: UUID
    event_type: str
    subject_id: str
    office: str
    value: bytes  # the Avro message as published
    voided: bool


async def original_event(pool: asyncpg.Pool, reference: str) -> StoredEvent | None:
    """An event as recorded, for a correction or void to refer to."""
    row = await pool.fetchrow(
        "SELECT i.reference, i.event_id, i.event_type, i.subject_id, i.registration_office,"
        "       o.message_value,"
        "       EXISTS (SELECT 1 FROM intake_record v WHERE v.follows_event_id = i.event_id"
        "                  AND v.event_type = 'EventVoided') AS voided"
        "  FROM intake_record i JOIN outbox o ON o.event_id = i.event_id"
        " WHERE i.reference = $1",
        reference,
    )
    if row is None:
        return None
    return StoredEvent(
        row["reference"],
        row["event_id"],
        row["event_type"],
        row["subject_id"],
        row["registration_office"],
        bytes(row["message_value"]),
        row["voided"],
    )


async def _existing(conn: asyncpg.Connection, key: str, fingerprint: str) -> Recorded | None:
    row = await conn.fetchrow(
        "SELECT reference, event_id, event_type, request_fingerprint"
        "  FROM intake_record WHERE idempotency_key = $1",
        key,
    )
    if row is None:
        return None
    if row["request_fingerprint"] != fingerprint:
        raise IdempotencyConflict(key)
    return Recorded(row["reference"], row["event_id"], row["event_type"], created=False)


async def record_event(pool: asyncpg.Pool, event: NewEvent) -> Recorded:
    """Store the intake record, the informant's consent choices and the outbox row
    atomically; a repeated idempotency key returns the first submission instead."""
    async with pool.acquire() as conn:
        if event.idempotency_key is not None:
            earlier = await _existing(conn, event.idempotency_key, event.request_fingerprint)
            if earlier is not None:
                return earlier
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO intake_record (reference, event_id, event_type, subject_id,"
                    " registration_office, recorded_by, idempotency_key, request_fingerprint,"
                    " recorded_at, follows_event_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    event.reference,
                    event.event_id,
                    event.event_type,
                    event.subject_id,
                    event.registration_office,
                    event.recorded_by,
                    event.idempotency_key,
                    event.request_fingerprint,
                    event.recorded_at,
                    event.follows_event_id,
                )
                ending = await _consents_ending(conn, event)
                await conn.executemany(
                    "INSERT INTO consent_record (subject_id, agency, event_type, choice,"
                    " recorded_by) VALUES ($1, $2, $3, $4, 'informant')",
                    [
                        (event.subject_id, a, event.event_type, c)
                        for a, c in event.consents
                        if a not in ending
                    ],
                )
                for agency in ending:
                    row = await conn.fetchrow(
                        "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
                        " VALUES ($1, $2, $3, 'refused', 'informant') RETURNING id, recorded_at",
                        event.subject_id,
                        agency,
                        event.event_type,
                    )
                    assert event.end_of_consent is not None  # only then is anything ending
                    await event.end_of_consent(conn, row["id"], agency, row["recorded_at"])
                await conn.execute(
                    "INSERT INTO outbox (event_id, topic, message_key, message_value, headers)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    event.event_id,
                    event.topic,
                    event.message_key,
                    event.message_value,
                    json.dumps([[k, v.decode()] for k, v in event.headers]),
                )
                await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        except asyncpg.UniqueViolationError:
            # A concurrent request with the same idempotency key won the race.
            if event.idempotency_key is None:
                raise
            earlier = await _existing(conn, event.idempotency_key, event.request_fingerprint)
            if earlier is None:
                raise
            return earlier
    return Recorded(event.reference, event.event_id, event.event_type, created=True)


async def _consents_ending(conn: asyncpg.Connection, event: NewEvent) -> list[str]:
    """Agencies the informant refuses now that had been given consent for this person
    and event type: they are told (``end_of_consent``), if the caller can tell them."""
    refused = [agency for agency, choice in event.consents if choice == "refused"]
    if event.end_of_consent is None or not refused:
        return []
    rows = await conn.fetch(
        "SELECT agency FROM current_consent WHERE subject_id = $1 AND event_type = $2"
        " AND agency = ANY($3::text[]) AND choice = 'given' ORDER BY agency",
        event.subject_id,
        event.event_type,
        refused,
    )
    return [r["agency"] for r in rows]


async def consent_agencies(pool: asyncpg.Pool, event_type: str) -> set[str]:
    """Agencies an informant may give consent to for this event type."""
    rows = await pool.fetch(
        "SELECT agency FROM subscription WHERE event_type = $1 AND legal_basis = 'consent'",
        event_type,
    )
    return {r["agency"] for r in rows}


async def event_status(
    pool: asyncpg.Pool, reference: str, office: str | None = None
) -> dict[str, Any] | None:
    """An event and, per agency, the routing decision, when the agency received it,
    its final (or latest) receipt, whether that is overdue, and how many times the
    event was redelivered, replayed or repeated; with ``office``, only if that office recorded it."""
    record = await pool.fetchrow(
        "SELECT i.reference, i.event_id, i.event_type, i.recorded_at,"
        "       (SELECT o.published_at FROM outbox o"  # the event's own row; later ones are redeliveries
        "         WHERE o.event_id = i.event_id ORDER BY o.id LIMIT 1) AS published_at"
        "  FROM intake_record i WHERE i.reference = $1 AND ($2::text IS NULL OR i.registration_office = $2)",
        reference,
        office,
    )
    if record is None:
        return None
    rows = await pool.fetch(
        # The router's decision per agency; where an operator's replay sent the event to an
        # agency the router did not deliver it to (a new agency, consent given later), the
        # replay's delivery stands in for it, so the citizen sees every agency that was told.
        "WITH decided AS ("
        "  SELECT event_id, agency, outcome, legal_basis, decided_at, fields_delivered, fields_withheld"
        "    FROM routing_decision WHERE event_id = $1),"
        " replayed AS ("
        "  SELECT DISTINCT ON (agency) event_id, agency, 'DELIVERED'::text AS outcome, legal_basis,"
        "         sent_at AS decided_at, fields_delivered, '{}'::text[] AS fields_withheld"
        "    FROM replay_delivery WHERE event_id = $1 ORDER BY agency, sent_at),"
        " d AS ("
        "  SELECT * FROM decided"
        "   WHERE outcome = 'DELIVERED' OR agency NOT IN (SELECT agency FROM replayed)"
        "  UNION ALL"
        "  SELECT * FROM replayed"
        "   WHERE agency NOT IN (SELECT agency FROM decided WHERE outcome = 'DELIVERED'))"
        "SELECT d.agency, d.outcome AS decision, d.legal_basis, d.decided_at,"
        "       d.fields_delivered, d.fields_withheld,"
        "       r.outcome AS receipt, r.reason, r.issued_at,"
        "       (SELECT min(x.received_at) FROM delivery_receipt x"
        "         WHERE x.event_id = d.event_id AND x.agency = d.agency) AS received_at,"
        "       o.due_at, o.flagged_at, (o.flagged_at IS NOT NULL AND o.receipted_at IS NULL) AS overdue,"
        "       (SELECT count(*) FROM receipt_duplicate u"
        "         WHERE u.event_id = d.event_id AND u.agency = d.agency) AS duplicates,"
        "       (SELECT count(*) FROM redelivery v"
        "         WHERE v.event_id = d.event_id AND v.agency = d.agency) AS redeliveries,"
        "       (SELECT count(*) FROM replay_delivery p"
        "         WHERE p.event_id = d.event_id AND p.agency = d.agency) AS replays"
        "  FROM d"
        "  LEFT JOIN LATERAL ("
        "    SELECT outcome, reason, issued_at FROM delivery_receipt r"
        "     WHERE r.event_id = d.event_id AND r.agency = d.agency"
        "     ORDER BY (r.outcome IN ('APPLIED', 'REJECTED')) DESC, issued_at DESC, stored_at DESC"
        "     LIMIT 1) r ON true"
        "  LEFT JOIN receipt_overdue o ON o.event_id = d.event_id AND o.agency = d.agency"
        " ORDER BY d.agency",
        record["event_id"],
    )
    return {
        "reference": record["reference"],
        "event_id": str(record["event_id"]),
        "event_type": record["event_type"],
        "recorded_at": record["recorded_at"].isoformat(),
        "published_at": _iso(record["published_at"]),
        "agencies": [
            {
                "agency": r["agency"],
                "decision": r["decision"].lower(),
                "legal_basis": r["legal_basis"],
                "decided_at": r["decided_at"].isoformat(),
                "delivered_at": r["decided_at"].isoformat() if r["decision"] == "DELIVERED" else None,
                "received_at": _iso(r["received_at"]),
                "fields_delivered": list(r["fields_delivered"]),
                "fields_withheld": list(r["fields_withheld"]),
                "receipt": None
                if r["receipt"] is None
                else {
                    "outcome": r["receipt"].lower(),
                    "reason": r["reason"],
                    "issued_at": r["issued_at"].isoformat(),
                },
                "overdue": bool(r["overdue"]),
                "receipt_due_at": _iso(r["due_at"]),
                "duplicates": r["duplicates"],
                "redeliveries": r["redeliveries"],
                "replays": r["replays"],
            }
            for r in rows
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
