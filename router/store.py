"""The router's queries: subscriptions, and consent as it stands right now."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from router.rules import Condition, ConsentState, OriginalDelivery, Subscription
from router.subscription_versions import Terms, say_who, write_terms


async def load_subscriptions(conn: asyncpg.Pool | asyncpg.Connection) -> list[Subscription]:
    rows = await conn.fetch(
        "SELECT agency, event_type, legal_basis, statute, valid_from, valid_to, status, fields,"
        "       condition::text AS condition, version FROM subscription"
    )
    return [
        Subscription(
            agency=r["agency"],
            event_type=r["event_type"],
            legal_basis=r["legal_basis"],
            statute=r["statute"],
            valid_from=r["valid_from"],
            valid_to=r["valid_to"],
            status=r["status"],
            fields=None if r["fields"] is None else frozenset(r["fields"]),
            condition=Condition.from_json(json.loads(r["condition"]) if r["condition"] else None),
            version=r["version"],
        )
        for r in rows
    ]


async def registered_interest(
    conn: asyncpg.Pool | asyncpg.Connection, subjects: Iterable[str]
) -> dict[str, frozenset[str]]:
    """subject → the agencies with a live registration of interest in it."""
    rows = await conn.fetch(
        "SELECT subject_id, array_agg(agency) AS agencies FROM agency_interest"
        " WHERE subject_id = ANY($1::text[]) GROUP BY subject_id",
        sorted(set(subjects)),
    )
    return {r["subject_id"]: frozenset(r["agencies"]) for r in rows}


async def current_consent(
    conn: asyncpg.Pool | asyncpg.Connection, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, ConsentState]]:
    """(subject_id, event_type) → agency → current choice."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    # Each wanted pair looked up by the index, as the current_consent view would answer it
    # (the latest choice per agency). Joining the view instead reads every consent record
    # ever made, on every batch: 800 ms for 5,000 subjects among 500,000 records, not 30.
    rows = await conn.fetch(
        "SELECT w.subject_id, w.event_type, c.agency, c.choice"
        "  FROM unnest($1::text[], $2::text[]) AS w(subject_id, event_type)"
        "  CROSS JOIN LATERAL ("
        "    SELECT DISTINCT ON (r.agency) r.agency, r.choice FROM consent_record r"
        "     WHERE r.subject_id = w.subject_id AND r.event_type = w.event_type"
        "     ORDER BY r.agency, r.id DESC) AS c",
        [s for s, _ in wanted],
        [t for _, t in wanted],
    )
    found: dict[tuple[str, str], dict[str, ConsentState]] = {}
    for r in rows:
        found.setdefault((r["subject_id"], r["event_type"]), {})[r["agency"]] = r["choice"]
    return found


async def agencies(conn: asyncpg.Pool | asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT DISTINCT agency FROM subscription ORDER BY agency")
    return [r["agency"] for r in rows]


@contextlib.asynccontextmanager
async def _transaction(db: asyncpg.Pool | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on a pooled connection, or within the caller's (a savepoint)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


async def upsert_subscription(
    db: asyncpg.Pool | asyncpg.Connection,
    *,
    agency: str,
    event_type: str,
    legal_basis: str,
    statute: str | None,
    fields: list[str] | None,
    condition: dict[str, object] | None,
    status: str = "active",
    by: str = "",
    reason: str = "",
) -> int:
    """Put these terms in force at once (an operator's or the seed's change; an agency's
    goes through ``router.subscription_versions.request_change``); returns the version,
    which records ``by`` and ``reason``."""
    if legal_basis not in ("statutory", "consent") or status not in ("active", "suspended"):
        raise ValueError(f"no legal basis {legal_basis!r} or status {status!r}")
    terms = Terms(
        legal_basis="statutory" if legal_basis == "statutory" else "consent",
        statute=statute,
        fields=None if fields is None else frozenset(fields),
        condition=Condition.from_json(condition),
        status="suspended" if status == "suspended" else "active",
    )
    async with _transaction(db) as conn:
        return await write_terms(
            conn, agency, event_type, terms, changed_by=by or "operator", reason=reason or "not given"
        )


async def set_subscription_status(
    db: asyncpg.Pool | asyncpg.Connection,
    agency: str,
    event_type: str | None,
    status: str,
    *,
    by: str = "",
    reason: str = "",
) -> int:
    async with _transaction(db) as conn:
        await say_who(conn, by or "operator", reason or "not given")
        result: str = await conn.execute(
            "UPDATE subscription SET status = $3 WHERE agency = $1 AND ($2::text IS NULL OR event_type = $2)",
            agency,
            event_type,
            status,
        )
    return int(result.rsplit(" ", 1)[-1])


async def list_subscriptions(conn: asyncpg.Pool | asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT agency, event_type, legal_basis, statute, fields, condition::text AS condition,"
        "       valid_from, valid_to, status, version FROM subscription ORDER BY agency, event_type"
    )
    return rows


async def record_consent(
    pool: asyncpg.Pool,
    *,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: ConsentState,
    recorded_by: str,
    appointment_id: UUID | None = None,
) -> datetime:
    """Append a consent choice and return the moment it is confirmed: after the
    commit, so every routing decision that starts later sees it. A proxy's change
    names the appointment it was made under."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by,"
                " appointment_id) VALUES ($1, $2, $3, $4, $5, $6)",
                subject_id,
                agency,
                event_type,
                choice,
                recorded_by,
                appointment_id,
            )
        confirmed: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return confirmed


@dataclass(frozen=True)
class OriginalEvent:
    event_type: str  # as recorded when it was routed, not as a correction claims
    deliveries: list[OriginalDelivery]


async def original_deliveries(
    conn: asyncpg.Pool | asyncpg.Connection, event_ids: list[str]
) -> dict[str, OriginalEvent]:
    """For each event id with recorded decisions: its type and the agencies it was
    delivered to (none when it reached nobody). Ids with no decisions are absent."""
    if not event_ids:
        return {}
    rows = await conn.fetch(
        "SELECT event_id::text AS event_id, event_type, agency, outcome, legal_basis, fields_delivered,"
        "       subscription_version"
        "  FROM routing_decision WHERE event_id = ANY($1::uuid[])"
        # An agency that got the original only from an operator's replay received it too:
        # its corrections and voids follow it there.
        " UNION ALL"
        " SELECT DISTINCT ON (r.event_id, r.agency) r.event_id::text, i.event_type, r.agency, 'DELIVERED',"
        "        r.legal_basis, r.fields_delivered, r.subscription_version"
        "   FROM replay_delivery r JOIN intake_record i USING (event_id)"
        "  WHERE r.event_id = ANY($1::uuid[])"
        "    AND EXISTS (SELECT 1 FROM routing_decision d WHERE d.event_id = r.event_id)"
        "    AND NOT EXISTS (SELECT 1 FROM routing_decision d WHERE d.event_id = r.event_id"
        "                     AND d.agency = r.agency AND d.outcome = 'DELIVERED')",
        event_ids,
    )
    found: dict[str, OriginalEvent] = {}
    for r in rows:
        original = found.setdefault(r["event_id"], OriginalEvent(r["event_type"], []))
        if r["outcome"] == "DELIVERED":
            original.deliveries.append(
                OriginalDelivery(
                    r["agency"], r["legal_basis"], frozenset(r["fields_delivered"]), r["subscription_version"]
                )
            )
    return found


@dataclass(frozen=True)
class AreaUnknown:
    reference: str
    event_id: UUID
    event_type: str
    decided_at: datetime
    agencies: list[str]  # the councils not told


async def area_unknown_decisions(
    conn: asyncpg.Pool | asyncpg.Connection, limit: int = 200
) -> list[AreaUnknown]:
    """Events withheld from councils because intake could not place an address in a local
    authority (``Outcome.WITHHELD_AREA_UNKNOWN``), newest first: for an operator to check the
    postcode, correct the event, or replay it once the directory knows the postcode."""
    rows = await conn.fetch(
        "SELECT i.reference, d.event_id, d.event_type, min(d.decided_at) AS decided_at,"
        "       array_agg(d.agency ORDER BY d.agency) AS agencies"
        "  FROM routing_decision d JOIN intake_record i ON i.event_id = d.event_id"
        " WHERE d.outcome = 'WITHHELD_AREA_UNKNOWN'"
        " GROUP BY i.reference, d.event_id, d.event_type"
        " ORDER BY min(d.decided_at) DESC LIMIT $1",
        limit,
    )
    return [AreaUnknown(**dict(r)) for r in rows]


@dataclass(frozen=True)
class StoredEvent:
    reference: str
    event_id: UUID
    event_type: str
    subject_id: str
    office: str
    recorded_at: datetime
    value: bytes  # the Avro message as published, sealed at rest (runtime.sealing)
    voided: bool


async def original_event(pool: asyncpg.Pool, reference: str) -> StoredEvent | None:
    """An event as intake recorded it: for a correction or void to refer to, or for an
    informant's reference (citizens.informants) to open."""
    row = await pool.fetchrow(
        "SELECT i.reference, i.event_id, i.event_type, i.subject_id, i.registration_office, i.recorded_at,"
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
        row["recorded_at"],
        bytes(row["message_value"]),
        row["voided"],
    )


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
        "  SELECT event_id, agency, outcome, legal_basis, decided_at, fields_delivered, fields_withheld,"
        "         subscription_version"
        "    FROM routing_decision WHERE event_id = $1),"
        " replayed AS ("
        "  SELECT DISTINCT ON (agency) event_id, agency, 'DELIVERED'::text AS outcome, legal_basis,"
        "         sent_at AS decided_at, fields_delivered, '{}'::text[] AS fields_withheld,"
        "         subscription_version"
        "    FROM replay_delivery WHERE event_id = $1 ORDER BY agency, sent_at),"
        " d AS ("
        "  SELECT * FROM decided"
        "   WHERE outcome = 'DELIVERED' OR agency NOT IN (SELECT agency FROM replayed)"
        "  UNION ALL"
        "  SELECT * FROM replayed"
        "   WHERE agency NOT IN (SELECT agency FROM decided WHERE outcome = 'DELIVERED'))"
        "SELECT d.agency, d.outcome AS decision, d.legal_basis, d.decided_at,"
        "       d.fields_delivered, d.fields_withheld, d.subscription_version,"
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
                "subscription_version": r["subscription_version"],
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
