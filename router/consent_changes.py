"""Telling the agencies that hold a person's data that their consent has stopped.

Two halves, joined by the outbox and Kafka, as life events are:

1. ``record_consent_change`` (the consent pages) appends the consent record and,
   when the choice ends consent (withdrawn or refused), writes a signed
   ``ConsentChanged`` message to the outbox in the same transaction: the relay
   publishes it to ``<prefix>.consent-changes``, so a confirmed withdrawal is never
   lost between the page and the agencies. The consent service signs it
   (``schemas.consent_signatures``), with the key that signs consent receipts.
2. ``notices`` (the router, in its exactly-once loop) verifies each message and
   passes it on, untouched, to the agency's own topic if that agency holds data
   about the person under that consent: a DELIVERED routing decision on the legal
   basis of consent, or a replay that sent it on that basis, for that subject and
   event type. Corrections and redeliveries only ever follow such a delivery.
   Every answer, told or not, is kept in ``consent_notice`` for the citizen's pages;
   the agency's receipt comes back as for any delivery (``delivery_receipt``).

A delivery decided in the moment before the withdrawal may have its decision stored
by the receipt tracker only after the router has answered "not held". The tracker
then asks again (``reask_missed``): it re-queues the change's stored outbox row, and
the router, reading the holding now, tells the agency. A per-subject lock taken by
both sides makes one of them see the other's commit, so no such delivery is missed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog
from aiokafka.structs import ConsumerRecord

from router.messages import Outgoing
from router.rules import ConsentState
from runtime import outbox
from runtime.dead_letters import dead_letter
from runtime.kafka import Topics
from runtime.keyring import KeyRing
from runtime.outbox import OutboxMessage
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import UndecodableMessage, decode, encode, models
from schemas.cloudevents import CloudEvent, MissingCloudEventHeader, headers_for
from schemas.consent_signatures import (
    CONSENT_CHANGED,
    CONSENT_SOURCE,
    ConsentSigner,
    consent_signature_headers,
    verify_consent_change,
)
from schemas.signatures import OfficeKey, SignatureRejected, SignedEvent, read_signature

log = structlog.get_logger(__name__)

COMPONENT = "router"
# Choices after which an agency must stop using what it was sent under consent.
CONSENT_ENDS: frozenset[str] = frozenset({"withdrawn", "refused"})


@dataclass(frozen=True)
class RecordedChange:
    confirmed_at: datetime  # after the commit: every routing decision that starts later sees it
    change_id: uuid.UUID | None  # the ConsentChanged message written, if the choice ends consent


async def record_consent_change(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: ConsentState,
    recorded_by: str,
    signer: ConsentSigner,
    appointment_id: uuid.UUID | None = None,
) -> RecordedChange:
    """Append a consent choice and, when it ends consent, its signed ConsentChanged
    message to the outbox, atomically (see ``router.store.record_consent``)."""
    async with pool.acquire() as conn:
        change_id: uuid.UUID | None = None
        async with conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by,"
                " appointment_id) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, recorded_at",
                subject_id,
                agency,
                event_type,
                choice,
                recorded_by,
                appointment_id,
            )
            if choice in CONSENT_ENDS:
                change_id = await announce(
                    conn,
                    settings,
                    signer,
                    consent_record_id=row["id"],
                    subject_id=subject_id,
                    agency=agency,
                    event_type=event_type,
                    choice=choice,
                    recorded_by=recorded_by,
                    recorded_at=row["recorded_at"],
                )
        confirmed: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return RecordedChange(confirmed, change_id)


async def announce(
    conn: asyncpg.Connection,
    settings: Settings,
    signer: ConsentSigner,
    *,
    consent_record_id: int,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
    recorded_by: str,
    recorded_at: datetime,
) -> uuid.UUID:
    """In the transaction that appended consent record ``consent_record_id`` (which ends
    consent): its signed ConsentChanged message to the outbox, for the relay. Returns
    the change id, also stored on the record."""
    change_id = uuid.uuid4()
    value, headers = consent_changed_message(
        settings,
        signer,
        change_id=change_id,
        subject_id=subject_id,
        agency=agency,
        event_type=event_type,
        choice=choice,
        recorded_by=recorded_by,
        recorded_at=recorded_at,
    )
    await conn.execute("UPDATE consent_record SET change_id = $2 WHERE id = $1", consent_record_id, change_id)
    await outbox.append(
        conn,
        [
            OutboxMessage(
                change_id,
                Topics(settings.topic_prefix).consent_changes,
                subject_id.encode(),
                PayloadSealer.from_settings(settings).seal(value, change_id),
                headers,
            )
        ],
    )
    return change_id


def consent_changed_message(
    settings: Settings,
    signer: ConsentSigner,
    *,
    change_id: uuid.UUID,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
    recorded_by: str,
    recorded_at: datetime,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers (CloudEvents and the consent service's signature)."""
    record = models.ConsentChanged(
        change_id=change_id,
        subject_id=subject_id,
        agency=agency,
        event_type=event_type,
        choice=choice.upper(),  # the stored choices, in the schema's spelling
        recorded_by=recorded_by.upper(),
        recorded_at=recorded_at,
    ).avro()
    value = encode(CONSENT_CHANGED, record)
    headers = headers_for(
        value,
        id=str(change_id),
        source=CONSENT_SOURCE,
        subject=subject_id,
        time=recorded_at,
        schema_base_url=settings.schema_base_url(),
    )
    return value, headers + consent_signature_headers(signer, record)


# --- the router's half -------------------------------------------------------------------------


class UnroutableConsentChange(ValueError):
    """A message on the consent-changes topic that is not a consent change the
    consent service signed; it goes to dead letters and reaches no agency."""


@dataclass(frozen=True)
class ConsentChange:
    record: ConsumerRecord[bytes, bytes]
    change_id: str
    subject_id: str
    agency: str
    event_type: str


@dataclass(frozen=True)
class _Parsed:
    record: ConsumerRecord[bytes, bytes]
    cloud_event: CloudEvent
    body: dict[str, object]
    signed: SignedEvent


def _parse(record: ConsumerRecord[bytes, bytes]) -> _Parsed:
    try:
        cloud_event = CloudEvent.from_headers(record.headers)
        subject, body = decode(record.value or b"")
        signed = read_signature(record.headers)
        uuid.UUID(cloud_event.id)
    except (MissingCloudEventHeader, UndecodableMessage, SignatureRejected, ValueError) as exc:
        raise UnroutableConsentChange(str(exc)) from None
    if subject != CONSENT_CHANGED or cloud_event.type != CONSENT_CHANGED:
        raise UnroutableConsentChange(f"{subject} ({cloud_event.type}) on the consent-changes topic")
    return _Parsed(record, cloud_event, body, signed)


def _verified(parsed: _Parsed, keys: Mapping[str, OfficeKey]) -> ConsentChange:
    try:
        verify_consent_change(
            parsed.signed,
            keys.get(parsed.signed.manifest.key_id),
            event_id=parsed.cloud_event.id,
            source=parsed.cloud_event.source,
            body=parsed.body,
        )
    except SignatureRejected as exc:
        raise UnroutableConsentChange(str(exc)) from None
    body = parsed.body
    return ConsentChange(
        parsed.record,
        str(body["change_id"]),
        str(body["subject_id"]),
        str(body["agency"]),
        str(body["event_type"]),
    )


async def holders(
    conn: asyncpg.Connection, wanted: Sequence[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Which (subject, agency, event type) triples name an agency that was sent that
    subject's events of that type on the basis of consent (routed, or replayed)."""
    if not wanted:
        return set()
    rows = await conn.fetch(
        "SELECT w.subject_id, w.agency, w.event_type"
        "  FROM unnest($1::text[], $2::text[], $3::text[]) AS w(subject_id, agency, event_type)"
        " WHERE EXISTS (SELECT 1 FROM intake_record i JOIN routing_decision d ON d.event_id = i.event_id"
        "                WHERE i.subject_id = w.subject_id AND i.event_type = w.event_type"
        "                  AND d.agency = w.agency AND d.outcome = 'DELIVERED' AND d.legal_basis = 'consent')"
        "    OR EXISTS (SELECT 1 FROM intake_record i JOIN replay_delivery r ON r.event_id = i.event_id"
        "                WHERE i.subject_id = w.subject_id AND i.event_type = w.event_type"
        "                  AND r.agency = w.agency AND r.legal_basis = 'consent')",
        [s for s, _, _ in wanted],
        [a for _, a, _ in wanted],
        [t for _, _, t in wanted],
    )
    return {(r["subject_id"], r["agency"], r["event_type"]) for r in rows}


# Serialises the router's answer about a subject's consent change with the tracker
# storing that subject's deliveries under consent (any fixed number used for nothing
# else: migrations hold 0x7475_6F00, the decision chain 0x7475_6F01, the relay 0x7475_6F52).
SUBJECT_LOCK_SPACE = 0x7475_6F43


async def lock_subjects(conn: asyncpg.Connection, subjects: Sequence[str]) -> None:
    """Hold, until the transaction ends, the lock of each subject (in one order, so two
    transactions locking several never deadlock)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, h)"
        "  FROM (SELECT DISTINCT hashtext(s) AS h FROM unnest($2::text[]) AS s ORDER BY h) AS locks",
        SUBJECT_LOCK_SPACE,
        list(subjects),
    )


async def reask_missed(conn: asyncpg.Connection, delivered: Sequence[tuple[str, str, datetime]]) -> int:
    """The tracker's part, in the transaction that stores ``delivered`` (event id,
    agency, decided at: deliveries on the basis of consent): for each consent change
    the router has already answered "not held" although one of these deliveries was
    decided before it, queue the change's message again. Returns how many."""
    if not delivered:
        return 0
    subjects = await conn.fetch(
        "SELECT DISTINCT subject_id FROM intake_record WHERE event_id = ANY($1::uuid[])",
        [event_id for event_id, _, _ in delivered],
    )
    await lock_subjects(conn, [r["subject_id"] for r in subjects])
    rows = await conn.fetch(
        "WITH missed AS ("
        "  SELECT DISTINCT c.change_id"
        "    FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS k(event_id, agency, decided_at)"
        "    JOIN intake_record i ON i.event_id = k.event_id"
        "    JOIN consent_record c ON c.subject_id = i.subject_id AND c.agency = k.agency"
        "                         AND c.event_type = i.event_type AND c.change_id IS NOT NULL"
        "                         AND c.recorded_at > k.decided_at"
        "    JOIN consent_notice n ON n.change_id = c.change_id AND n.agency = c.agency AND NOT n.told)"
        " SELECT DISTINCT ON (o.event_id) o.event_id, o.topic, o.message_key, o.message_value,"
        "        o.headers::text AS headers"
        "   FROM outbox o JOIN missed m ON o.event_id = m.change_id"
        "  ORDER BY o.event_id, o.id",
        [event_id for event_id, _, _ in delivered],
        [agency for _, agency, _ in delivered],
        [decided_at for _, _, decided_at in delivered],
    )
    # The change's stored message, published again as it was first written.
    await outbox.append(
        conn,
        [
            OutboxMessage(r["event_id"], r["topic"], r["message_key"], r["message_value"], r["headers"])
            for r in rows
        ],
    )
    if rows:
        for row in rows:
            log.info("consent_change_asked_again", change_id=str(row["event_id"]))
    return len(rows)


async def notices(
    pool: asyncpg.Pool, topics: Topics, records: list[ConsumerRecord[bytes, bytes]], *, keys: KeyRing
) -> tuple[list[Outgoing], int]:
    """What a batch of consent changes should produce: each one, untouched, to its
    agency if that agency holds data under the consent, and a dead letter for each
    message that is not a signed consent change. Returns those and how many were
    dead-lettered. The answers are stored in ``consent_notice`` before returning."""
    outgoing: list[Outgoing] = []
    dead = 0

    def reject(record: ConsumerRecord[bytes, bytes], exc: Exception) -> None:
        nonlocal dead
        letter = dead_letter(record, COMPONENT, str(exc))
        outgoing.append(Outgoing(topics.dead_letters, letter.key, letter.value, letter.headers))
        dead += 1
        log.warning(
            "consent_change_dead_lettered", partition=record.partition, offset=record.offset, reason=str(exc)
        )

    parsed: list[_Parsed] = []
    for record in records:
        try:
            parsed.append(_parse(record))
        except UnroutableConsentChange as exc:
            reject(record, exc)
    known = await keys.resolve({p.signed.manifest.key_id for p in parsed})
    changes: list[ConsentChange] = []
    for one in parsed:
        try:
            changes.append(_verified(one, known))
        except UnroutableConsentChange as exc:
            reject(one.record, exc)
    if not changes:
        return outgoing, dead
    async with pool.acquire() as conn, conn.transaction():
        await lock_subjects(conn, [c.subject_id for c in changes])
        holding = await holders(conn, [(c.subject_id, c.agency, c.event_type) for c in changes])
        first = list({c.change_id: c for c in reversed(changes)}.values())  # one row per change
        # A batch routed again after an abort keeps its first answer, or widens it to
        # "told" if the holding has been stored since: the page never un-tells an agency.
        rows = await conn.fetch(
            "INSERT INTO consent_notice (change_id, agency, told)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::boolean[])"
            " ON CONFLICT (change_id, agency) DO UPDATE SET told = consent_notice.told OR EXCLUDED.told"
            " RETURNING change_id::text AS change_id, told",
            [c.change_id for c in first],
            [c.agency for c in first],
            [(c.subject_id, c.agency, c.event_type) in holding for c in first],
        )
    answers = {r["change_id"]: r["told"] for r in rows}
    told = [answers[c.change_id] for c in changes]
    for change, tell in zip(changes, told, strict=True):
        if tell:
            record = change.record
            outgoing.append(
                Outgoing(topics.agency(change.agency), record.key, record.value, list(record.headers))
            )
        log.info("consent_change_routed", change_id=change.change_id, agency=change.agency, told=tell)
    return outgoing, dead
