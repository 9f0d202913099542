"""Intake's queries: record an event with its outbox row (and the informant's
consent choices, each with its consent receipt) in one transaction, and read an
event's status back by reference number."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from producers.duplicates import DuplicateRegistration, NothingToOverride
from router.consent_receipts import DeskConsent
from runtime import outbox
from runtime.outbox import OutboxMessage

CLAIM_HELD = "registration_claim_held"  # the unique index that refuses a second registration


@dataclass(frozen=True)
class Recorded:
    reference: str
    event_id: UUID
    event_type: str
    created: bool  # False when an idempotent retry returned an earlier submission


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different submission."""


class StaleSigningKey(Exception):
    """The event was signed with an office key retired meanwhile: sign it again; nothing
    of it is stored (an agency would refuse a signature recorded after its key retired)."""


class SubjectMovedMeanwhile(Exception):
    """Another correction changed the subject's NINO after this one read it."""


@dataclass(frozen=True)
class SubjectLink:
    """A correction of the subject's NINO: the corrected registration is about
    ``new_subject_id`` from now on, no longer ``previous_subject_id``."""

    corrected_event_id: UUID
    previous_subject_id: str
    new_subject_id: str


@dataclass(frozen=True)
class Override:
    """A supervisor's decision to record a registration over an existing one."""

    existing_reference: str
    reason: str


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
    claims: tuple[str, ...] = ()  # what identifies its subject (producers.duplicates)
    override: Override | None = None
    releases_claims_of: UUID | None = None  # a void: the registration it frees
    channel: str = "desk"  # how the informant gave the consents: desk, phone, online, system
    # GSS codes of the subject's addresses (see router.rules.SUBJECT_ADDRESSES), for the
    # citizen's consent page; None when the event carries none (a void).
    local_authorities: list[str] | None = None
    subject_link: SubjectLink | None = None  # set when a correction fixes the subject's NINO
    end_of_consent: EndOfConsent | None = None  # None: refusals are only recorded
    signing_key_id: str | None = None  # checked still active when stored, and kept so until commit
    routing_facts: bytes | None = None  # sealed, for replay (router.facts); None for follow-ups


class ConsentReceipts(Protocol):
    """Whoever signs the desk's consent receipts (``router.consent_receipts``, wired in by
    ``producers.intake``): called inside the event's transaction, so a choice is stored
    with its receipt or not at all."""

    async def issue_for_desk(self, conn: asyncpg.Connection, consents: Sequence[DeskConsent]) -> None: ...


@dataclass(frozen=True)
class LatestLink:
    correction_event_id: UUID
    new_subject_id: str
    correction_value: bytes  # the correction's sealed message, which holds the NINO it set


async def latest_link(conn: asyncpg.Pool | asyncpg.Connection, corrected_event_id: UUID) -> LatestLink | None:
    """The last correction of this registration's subject NINO, if any: whose it is now."""
    row = await conn.fetchrow(
        "SELECT l.correction_event_id, l.new_subject_id, o.message_value"
        "  FROM subject_link l JOIN outbox o ON o.event_id = l.correction_event_id"
        " WHERE l.corrected_event_id = $1 ORDER BY l.id DESC LIMIT 1",
        corrected_event_id,
    )
    if row is None:
        return None
    return LatestLink(row["correction_event_id"], row["new_subject_id"], bytes(row["message_value"]))


async def _link_subject(conn: asyncpg.Connection, correction_event_id: UUID, link: SubjectLink) -> None:
    # The registration's row is locked so that two NINO corrections made at once are
    # applied one after the other: the second sees the first and is refused.
    subject_id = await conn.fetchval(
        "SELECT subject_id FROM intake_record WHERE event_id = $1 FOR UPDATE", link.corrected_event_id
    )
    latest = await latest_link(conn, link.corrected_event_id)
    if (latest.new_subject_id if latest else subject_id) != link.previous_subject_id:
        raise SubjectMovedMeanwhile(link.corrected_event_id)
    await conn.execute(
        "INSERT INTO subject_link (correction_event_id, corrected_event_id, previous_subject_id,"
        " new_subject_id) VALUES ($1, $2, $3, $4)",
        correction_event_id,
        link.corrected_event_id,
        link.previous_subject_id,
        link.new_subject_id,
    )


async def earlier_submission(pool: asyncpg.Pool, key: str, fingerprint: str) -> Recorded | None:
    """What a request with this idempotency key recorded before, if anything."""
    async with pool.acquire() as conn:
        return await _existing(conn, key, fingerprint)


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


async def record_event(
    pool: asyncpg.Pool, event: NewEvent, receipts: ConsentReceipts | None = None
) -> Recorded:
    """Store the intake record, its claims, the informant's consent choices (with a
    receipt for each when ``receipts`` is given) and the outbox row atomically; a
    repeated idempotency key returns the first submission instead, and a registration
    whose claim another holds is refused."""
    async with pool.acquire() as conn:
        # Twice at most: a holder voided between our insert and our look-up frees the claim.
        for attempt in (1, 2):
            if event.idempotency_key is not None:
                earlier = await _existing(conn, event.idempotency_key, event.request_fingerprint)
                if earlier is not None:
                    return earlier
            try:
                async with conn.transaction():
                    await _insert(conn, event, receipts)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == CLAIM_HELD:
                    holder = await claim_holder(conn, event.claims)
                    if holder is None and attempt == 1:
                        continue
                    if holder is None:
                        raise
                    raise DuplicateRegistration(event.event_type, *holder) from None
                # A concurrent request with the same idempotency key won the race.
                if event.idempotency_key is None:
                    raise
                earlier = await _existing(conn, event.idempotency_key, event.request_fingerprint)
                if earlier is None:
                    raise
                return earlier
            return Recorded(event.reference, event.event_id, event.event_type, created=True)
    raise AssertionError("unreachable")  # pragma: no cover


async def stale_signing_keys(conn: asyncpg.Connection, key_ids: set[str]) -> set[str]:
    """Of these office keys, those retired; the others are locked (FOR SHARE) until the
    caller's transaction ends, so a rotation waits for it and retires them after it."""
    if not key_ids:
        return set()
    rows = await conn.fetch(
        "SELECT key_id FROM office_signing_key"
        " WHERE key_id = ANY($1::text[]) AND retired_at IS NULL FOR SHARE",
        sorted(key_ids),
    )
    return key_ids - {r["key_id"] for r in rows}


async def _insert(conn: asyncpg.Connection, event: NewEvent, receipts: ConsentReceipts | None) -> None:
    if event.signing_key_id is not None and await stale_signing_keys(conn, {event.signing_key_id}):
        raise StaleSigningKey(event.signing_key_id)
    if event.subject_link is not None:
        # Lock the corrected registration before this correction's own row refers to it:
        # two NINO corrections at once then queue here, instead of each holding the key-share
        # lock of its reference and deadlocking on the other's (see _link_subject).
        await conn.execute(
            "SELECT 1 FROM intake_record WHERE event_id = $1 FOR UPDATE",
            event.subject_link.corrected_event_id,
        )
    await conn.execute(
        "INSERT INTO intake_record (reference, event_id, event_type, subject_id,"
        " registration_office, recorded_by, idempotency_key, request_fingerprint,"
        " recorded_at, follows_event_id, local_authorities, channel)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
        event.local_authorities,
        event.channel,
    )
    if event.subject_link is not None:
        await _link_subject(conn, event.event_id, event.subject_link)
    await _claim(conn, event)
    await record_consents(conn, [event], receipts)
    await outbox.append(
        conn,
        [
            OutboxMessage(
                event.event_id,
                event.topic,
                event.message_key,
                event.message_value,
                event.headers,
                event.routing_facts,
            )
        ],
    )


async def _claim(conn: asyncpg.Connection, event: NewEvent) -> None:
    """Release a voided registration's claims, or take this registration's: held, or
    (overridden by a supervisor) recorded beside the holder's, with who, why and over which."""
    if event.releases_claims_of is not None:
        await conn.execute(
            "UPDATE registration_claim SET released_at = now() WHERE event_id = $1 AND released_at IS NULL",
            event.releases_claims_of,
        )
    if not event.claims:
        return
    if event.override is None:
        # The unique index decides: a concurrent duplicate waits for this transaction, then fails.
        await conn.executemany(
            "INSERT INTO registration_claim (claim, event_id) VALUES ($1, $2)",
            [(claim, event.event_id) for claim in event.claims],
        )
        return
    holders = await conn.fetch(
        # Locked, so that the registration overridden cannot be voided under us.
        "SELECT i.reference FROM registration_claim c JOIN intake_record i USING (event_id)"
        " WHERE c.claim = ANY($1::text[]) AND c.released_at IS NULL AND NOT c.overridden"
        "   FOR UPDATE OF c",
        list(event.claims),
    )
    duplicated = sorted({r["reference"] for r in holders})
    if event.override.existing_reference not in duplicated:
        raise NothingToOverride(duplicated)
    await conn.executemany(
        "INSERT INTO registration_claim (claim, event_id, overridden) VALUES ($1, $2, true)",
        [(claim, event.event_id) for claim in event.claims],
    )
    await conn.execute(
        "INSERT INTO duplicate_override (event_id, existing_reference, reason, overridden_by)"
        " VALUES ($1, $2, $3, $4)",
        event.event_id,
        event.override.existing_reference,
        event.override.reason,
        event.recorded_by,
    )


async def claim_holder(conn: asyncpg.Connection, claims: tuple[str, ...]) -> tuple[str, str] | None:
    """The reference and office of the registration holding any of these claims."""
    row = await conn.fetchrow(
        "SELECT i.reference, i.registration_office"
        "  FROM registration_claim c JOIN intake_record i USING (event_id)"
        " WHERE c.claim = ANY($1::text[]) AND c.released_at IS NULL AND NOT c.overridden"
        " ORDER BY i.recorded_at LIMIT 1",
        list(claims),
    )
    return None if row is None else (row["reference"], row["registration_office"])


async def duplicate_override(pool: asyncpg.Pool, reference: str) -> dict[str, Any] | None:
    """Who recorded this registration over which existing one, when and why."""
    row = await pool.fetchrow(
        "SELECT d.existing_reference, d.reason, d.overridden_by, d.overridden_at"
        "  FROM duplicate_override d JOIN intake_record i USING (event_id) WHERE i.reference = $1",
        reference,
    )
    if row is None:
        return None
    return {
        "existing_reference": row["existing_reference"],
        "reason": row["reason"],
        "overridden_by": row["overridden_by"],
        "overridden_at": row["overridden_at"].isoformat(),
    }


async def consent_receipts_for_event(pool: asyncpg.Pool, event_id: UUID) -> list[dict[str, str]]:
    """The consent receipts issued for the informant's choices made with an event, in order."""
    rows = await pool.fetch(
        "SELECT receipt_id::text AS receipt_id, agency, choice, token FROM consent_receipt"
        " WHERE event_id = $1 ORDER BY consent_record_id",
        event_id,
    )
    return [
        {"receipt_id": r["receipt_id"], "agency": r["agency"], "choice": r["choice"], "receipt": r["token"]}
        for r in rows
    ]


async def record_consents(
    conn: asyncpg.Connection, events: Sequence[NewEvent], receipts: ConsentReceipts | None
) -> None:
    """The informant's choices made with these events, each with its receipt, in one
    statement; a refusal that ends a consent given before (read before any choice is
    added) is passed on through the event's ``end_of_consent``."""
    choices = [(e, agency, choice) for e in events for agency, choice in e.consents]
    if not choices:
        return
    ending = await _refusals_ending_consent(conn, choices)
    rows = await conn.fetch(
        "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
        " SELECT subject_id, agency, event_type, choice, 'informant'"
        "   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY"
        "        AS c (subject_id, agency, event_type, choice, n)"
        "  ORDER BY n"
        " RETURNING id, recorded_at",
        [e.subject_id for e, _, _ in choices],
        [agency for _, agency, _ in choices],
        [e.event_type for e, _, _ in choices],
        [choice for _, _, choice in choices],
    )
    # bigserial, assigned in the SELECT's order: sorted by id, the rows are the choices'.
    stored = sorted((r["id"], r["recorded_at"]) for r in rows)
    desk: list[DeskConsent] = []
    for i, ((event, agency, choice), (record_id, recorded_at)) in enumerate(
        zip(choices, stored, strict=True)
    ):
        if i in ending:
            assert event.end_of_consent is not None  # only then is anything ending
            await event.end_of_consent(conn, record_id, agency, recorded_at)
        desk.append(
            DeskConsent(
                consent_record_id=record_id,
                subject_id=event.subject_id,
                agency=agency,
                event_type=event.event_type,
                choice=choice,
                recorded_at=recorded_at,
                event_id=event.event_id,
                channel=event.channel,
            )
        )
    if receipts is not None:
        await receipts.issue_for_desk(conn, desk)


async def _refusals_ending_consent(
    conn: asyncpg.Connection, choices: list[tuple[NewEvent, str, str]]
) -> set[int]:
    """Which refusals (by index into ``choices``) end a consent that had been given."""
    asked = [
        (i, event.subject_id, event.event_type, agency)
        for i, (event, agency, choice) in enumerate(choices)
        if choice == "refused" and event.end_of_consent is not None
    ]
    if not asked:
        return set()
    rows = await conn.fetch(
        "SELECT r.i FROM unnest($1::int[], $2::text[], $3::text[], $4::text[])"
        "                AS r (i, subject_id, event_type, agency)"
        " CROSS JOIN LATERAL (SELECT c.choice FROM consent_record c"
        "                      WHERE c.subject_id = r.subject_id AND c.agency = r.agency"
        "                        AND c.event_type = r.event_type"
        "                      ORDER BY c.id DESC LIMIT 1) latest"
        " WHERE latest.choice = 'given'",
        [i for i, *_ in asked],
        [subject for _, subject, _, _ in asked],
        [event_type for _, _, event_type, _ in asked],
        [agency for *_, agency in asked],
    )
    return {r["i"] for r in rows}


SUBSCRIPTIONS_CHANNEL = "tuo_subscriptions"  # migration 0026's trigger NOTIFYs here on any change


async def consent_agencies(pool: asyncpg.Pool, event_type: str) -> frozenset[str]:
    """Agencies an informant may give consent to for this event type."""
    rows = await pool.fetch(
        "SELECT agency FROM subscription WHERE event_type = $1 AND legal_basis = 'consent'",
        event_type,
    )
    return frozenset(r["agency"] for r in rows)
