"""Group commit: registrations arriving together share one transaction.

Each registration is otherwise a transaction of its own, with about ten round trips
to PostgreSQL and a commit (an fsync) each. Here a single writer takes every
registration waiting when it is free, up to ``MAX_GROUP``, and records them all with
set-based statements (``unnest``): intake records, claims, the informant's consent
choices with their receipts, and outbox rows with one ``NOTIFY``. While it commits,
the next group gathers, so the window is as long as a commit and no longer: a lone
registration waits for nobody. Each request is answered only after its group commits.

What each request gets is what ``record_event`` would have given it alone:
- a repeated idempotency key gets the first submission (or ``IdempotencyConflict``);
- a registration whose claim is held is refused (``DuplicateRegistration``), and
  nothing of it is stored; so is one signed with a key retired meanwhile
  (``StaleSigningKey``: intake signs it again);
- two registrations of one subject, or with one idempotency key, are never in one
  group: the later waits for the next, so it sees the earlier committed, exactly as
  it would have one at a time;
- if the group's transaction fails for any other reason, nothing of it is stored and
  every registration in it is recorded on its own, with its own answer.
Corrections, voids, NINO corrections and overrides always go through ``record_event``.
A request abandoned after its registration joined a group (the client hung up) is
still recorded: its retry finds it by idempotency key, or is refused as a duplicate.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
import structlog

from producers.duplicates import DuplicateRegistration
from producers.store import (
    ConsentReceipts,
    IdempotencyConflict,
    NewEvent,
    Recorded,
    StaleSigningKey,
    claim_holder,
    record_consents,
    record_event,
    stale_signing_keys,
)
from runtime import outbox
from runtime.outbox import OutboxMessage

log = structlog.get_logger(__name__)

MAX_GROUP = 256


def groupable(event: NewEvent) -> bool:
    """A plain registration: nothing that reads or locks another event's rows."""
    return (
        event.follows_event_id is None
        and event.subject_link is None
        and event.override is None
        and event.releases_claims_of is None
    )


@dataclass
class _Waiting:
    event: NewEvent
    answer: asyncio.Future[Recorded]


@dataclass
class _Outcome:
    """What became of a group: answered now, or left for ``record_event`` after it."""

    recorded: list[_Waiting] = field(default_factory=list)
    answered: list[tuple[_Waiting, Recorded | Exception]] = field(default_factory=list)
    refused: list[_Waiting] = field(default_factory=list)  # a claim is held: whose, looked up after
    alone: list[_Waiting] = field(default_factory=list)


class GroupCommit:
    """Records registrations in shared transactions (see the module)."""

    def __init__(
        self, pool: asyncpg.Pool, receipts: ConsentReceipts | None, max_group: int = MAX_GROUP
    ) -> None:
        self.pool = pool
        self.receipts = receipts
        self.max_group = max_group
        self.groups = 0  # transactions committed for groups, and the registrations in them
        self.grouped = 0
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, event: NewEvent) -> Recorded:
        if not groupable(event):
            return await record_event(self.pool, event, self.receipts)
        waiting = _Waiting(event, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return await waiting.answer

    async def close(self) -> None:
        """Wait for the registrations already taken (the app's shutdown)."""
        if self._writer is not None:
            await self._writer

    async def _write(self) -> None:
        while self._waiting:
            group, later = _split(self._waiting[: self.max_group])
            self._waiting = later + self._waiting[self.max_group :]
            try:
                await self._commit(group)
            except Exception as exc:
                log.exception("group_commit_failed", registrations=len(group))
                for waiting in group:
                    _answer(waiting, exc)

    async def _commit(self, group: list[_Waiting]) -> None:
        group = [w for w in group if not w.answer.cancelled()]  # a request gone before it was taken
        if not group:
            return
        async with self.pool.acquire() as conn:
            try:
                outcome = await _record_group(conn, group, self.receipts)
            except (asyncpg.PostgresError, ValueError) as exc:
                # Rolled back whole: each is recorded on its own, and gets its own answer.
                log.warning("group_commit_fell_back", registrations=len(group), error=type(exc).__name__)
                outcome = _Outcome(alone=group)
            else:
                self.groups += 1
                self.grouped += len(outcome.recorded)
            for waiting in outcome.recorded:
                event = waiting.event
                _answer(waiting, Recorded(event.reference, event.event_id, event.event_type, created=True))
            for waiting, answer in outcome.answered:
                _answer(waiting, answer)
            for waiting in outcome.refused:
                holder = await claim_holder(conn, waiting.event.claims)
                if holder is None:  # voided since: its claim is free again
                    outcome.alone.append(waiting)
                else:
                    _answer(waiting, DuplicateRegistration(waiting.event.event_type, *holder))
        for waiting in outcome.alone:  # in arrival order, one at a time
            try:
                _answer(waiting, await record_event(self.pool, waiting.event, self.receipts))
            except Exception as exc:  # noqa: BLE001 (handed to the request that waits for it)
                _answer(waiting, exc)


def _answer(waiting: _Waiting, answer: Recorded | BaseException) -> None:
    if waiting.answer.done():  # the request was cancelled meanwhile
        return
    if isinstance(answer, BaseException):
        waiting.answer.set_exception(answer)
    else:
        waiting.answer.set_result(answer)


def _split(candidates: Sequence[_Waiting]) -> tuple[list[_Waiting], list[_Waiting]]:
    """(a group with one registration per subject and per idempotency key, the rest
    in order): a later one about the same subject or key must see the earlier committed."""
    group: list[_Waiting] = []
    later: list[_Waiting] = []
    subjects: set[str] = set()
    keys: set[str] = set()
    for waiting in candidates:
        event = waiting.event
        if event.subject_id in subjects or (
            event.idempotency_key is not None and event.idempotency_key in keys
        ):
            later.append(waiting)
            continue
        subjects.add(event.subject_id)
        if event.idempotency_key is not None:
            keys.add(event.idempotency_key)
        group.append(waiting)
    return group, later


async def _record_group(
    conn: asyncpg.Connection, group: list[_Waiting], receipts: ConsentReceipts | None
) -> _Outcome:
    outcome = _Outcome()
    earlier = {
        r["idempotency_key"]: r
        for r in await conn.fetch(
            "SELECT idempotency_key, reference, event_id, event_type, request_fingerprint"
            "  FROM intake_record WHERE idempotency_key = ANY($1::text[])",
            [w.event.idempotency_key for w in group if w.event.idempotency_key is not None],
        )
    }
    fresh: list[_Waiting] = []
    for waiting in group:
        event = waiting.event
        row = earlier.get(event.idempotency_key)
        if row is None:
            fresh.append(waiting)
        elif row["request_fingerprint"] != event.request_fingerprint:
            outcome.answered.append((waiting, IdempotencyConflict(event.idempotency_key)))
        else:
            outcome.answered.append(
                (waiting, Recorded(row["reference"], row["event_id"], row["event_type"], created=False))
            )
    if not fresh:
        return outcome
    async with conn.transaction():
        stale = await stale_signing_keys(
            conn, {k for w in fresh if (k := w.event.signing_key_id) is not None}
        )
        outcome.answered += [
            (w, StaleSigningKey(w.event.signing_key_id)) for w in fresh if w.event.signing_key_id in stale
        ]
        fresh = [w for w in fresh if w.event.signing_key_id not in stale]
        stored = await _insert_records(conn, [w.event for w in fresh])
        # Not stored: a request with its idempotency key, outside the group, was first.
        outcome.alone = [w for w in fresh if w.event.event_id not in stored]
        fresh = [w for w in fresh if w.event.event_id in stored]
        refused = await _claim(conn, [w.event for w in fresh])
        outcome.refused = [w for w in fresh if w.event.event_id in refused]
        kept = [w for w in fresh if w.event.event_id not in refused]
        await record_consents(conn, [w.event for w in kept], receipts)
        await outbox.append(
            conn,
            [
                OutboxMessage(e.event_id, e.topic, e.message_key, e.message_value, e.headers, e.routing_facts)
                for e in (w.event for w in kept)
            ],
        )
    outcome.recorded = kept
    return outcome


async def _insert_records(conn: asyncpg.Connection, events: list[NewEvent]) -> set[UUID]:
    rows = await conn.fetch(
        "INSERT INTO intake_record (reference, event_id, event_type, subject_id,"
        " registration_office, recorded_by, idempotency_key, request_fingerprint,"
        " recorded_at, local_authorities, channel)"
        " SELECT reference, event_id, event_type, subject_id, office, recorded_by, idempotency_key,"
        "        fingerprint, recorded_at,"
        "        CASE WHEN authorities IS NULL THEN NULL"
        "             ELSE ARRAY(SELECT jsonb_array_elements_text(authorities::jsonb)) END, channel"
        "   FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],"
        "               $7::text[], $8::text[], $9::timestamptz[], $10::text[], $11::text[]) WITH ORDINALITY"
        "        AS r(reference, event_id, event_type, subject_id, office, recorded_by, idempotency_key,"
        "             fingerprint, recorded_at, authorities, channel, n)"
        "  ORDER BY n"
        " ON CONFLICT DO NOTHING"
        " RETURNING event_id",
        [e.reference for e in events],
        [e.event_id for e in events],
        [e.event_type for e in events],
        [e.subject_id for e in events],
        [e.registration_office for e in events],
        [e.recorded_by for e in events],
        [e.idempotency_key for e in events],
        [e.request_fingerprint for e in events],
        [e.recorded_at for e in events],
        [None if e.local_authorities is None else json.dumps(e.local_authorities) for e in events],
        [e.channel for e in events],
    )
    return {r["event_id"] for r in rows}


async def _claim(conn: asyncpg.Connection, events: list[NewEvent]) -> set[UUID]:
    """Take every registration's claims; the event ids of those refused, of which nothing
    is left stored. A claim held by a transaction still open is waited for, as alone."""
    claimed = [(claim, e.event_id) for e in events for claim in e.claims]
    if not claimed:
        return set()
    rows = await conn.fetch(
        "INSERT INTO registration_claim (claim, event_id)"
        " SELECT * FROM unnest($1::text[], $2::uuid[])"
        " ON CONFLICT DO NOTHING"
        " RETURNING event_id",
        [claim for claim, _ in claimed],
        [event_id for _, event_id in claimed],
    )
    taken = Counter(r["event_id"] for r in rows)
    refused = {e.event_id for e in events if taken[e.event_id] < len(e.claims)}
    if refused:
        await conn.execute("DELETE FROM registration_claim WHERE event_id = ANY($1::uuid[])", list(refused))
        await conn.execute("DELETE FROM intake_record WHERE event_id = ANY($1::uuid[])", list(refused))
    return refused
