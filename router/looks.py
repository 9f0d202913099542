"""Every look at personal data by the service's staff, recorded for the person to see.

An operator's command that shows or selects a person's records (``tuo status``, ``tuo
dlq show``, a replay of one person's events), and a registrar's attempt to open another
office's registration (refused, and recorded all the same), appends a row to
``data_look`` (migration 0036): who, in what role, when, what they did, why, and which
people's records (pseudonymous subject ids) and events it concerned. The citizen's
pages list the looks at their records.

The rows are chained as the routing decisions are (``router.audit``): each stores the
previous row's hash and a SHA-256 over its own content and that hash, appended under one
advisory lock, so ``verify`` (``tuo audit verify``) names a row that was altered,
removed or inserted.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from router.audit import GENESIS, Finding, verify_chain
from runtime.reasons import NotPlainWords, checked_name, checked_reason

_LOOK_CHAIN_LOCK = 0x7475_6F02


class Action(StrEnum):
    """What was done, in the words the citizen reads."""

    STATUS = "looked at who was told about an event, and what they did"
    DEAD_LETTER = "looked at a message about you that could not be delivered"
    REPLAY = "chose your events to send again to an organisation"
    OTHER_OFFICE = "tried to open a registration recorded by another register office, and was refused"


class LookRefused(ValueError):
    """A look that cannot be recorded as asked (no reason, a reason that is not plain text)."""


@dataclass(frozen=True)
class Look:
    seq: int
    looked_at: datetime
    who: str
    role: str  # operator | registrar
    action: str
    reason: str
    refused: bool
    subject_ids: list[str]
    event_ids: list[uuid.UUID]


def check_reason(reason: str) -> str:
    try:
        return checked_reason(reason)
    except NotPlainWords as exc:
        raise LookRefused(f"say why you look: {exc}; the person will see it") from exc


def row_hash(seq: int, look: Look, prev_hash: str) -> str:
    content = "\x1f".join(
        [
            str(seq),
            look.looked_at.isoformat(),
            look.who,
            look.role,
            look.action,
            look.reason,
            "refused" if look.refused else "shown",
            ",".join(sorted(look.subject_ids)),
            ",".join(sorted(str(e) for e in look.event_ids)),
            prev_hash,
        ]
    )
    return hashlib.sha256(content.encode()).hexdigest()


async def record_look(
    pool: asyncpg.Pool,
    *,
    who: str,
    role: str,
    action: Action,
    reason: str,
    subject_ids: Sequence[str],
    event_ids: Sequence[uuid.UUID | str] = (),
    refused: bool = False,
) -> Look:
    """Append one look to the chain, before what was looked at is shown."""
    reason = check_reason(reason)
    try:
        who = checked_name(who)
    except NotPlainWords as exc:
        raise LookRefused(f"who looks: {exc}") from exc
    events = sorted({uuid.UUID(str(e)) for e in event_ids})
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOOK_CHAIN_LOCK)
        head = await conn.fetchrow("SELECT seq, hash FROM data_look ORDER BY seq DESC LIMIT 1")
        seq = 1 if head is None else head["seq"] + 1
        prev_hash = GENESIS if head is None else head["hash"]
        looked_at: datetime = await conn.fetchval("SELECT date_trunc('microseconds', clock_timestamp())")
        look = Look(
            seq, looked_at, who, role, action.value, reason, refused, sorted(set(subject_ids)), events
        )
        await conn.execute(
            "INSERT INTO data_look (seq, looked_at, who, role, action, reason, refused, subject_ids,"
            " event_ids, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            seq,
            looked_at,
            who,
            role,
            look.action,
            reason,
            refused,
            look.subject_ids,
            events,
            prev_hash,
            row_hash(seq, look, prev_hash),
        )
    return look


def _look(row: Any) -> Look:
    return Look(
        row["seq"],
        row["looked_at"],
        row["who"],
        row["role"],
        row["action"],
        row["reason"],
        row["refused"],
        list(row["subject_ids"]),
        list(row["event_ids"]),
    )


async def looks_at(pool: asyncpg.Pool, subject_id: str) -> list[Look]:
    """Every look at the subject's records, newest first."""
    rows = await pool.fetch(
        "SELECT * FROM data_look WHERE subject_ids @> ARRAY[$1]::text[] ORDER BY seq DESC", subject_id
    )
    return [_look(r) for r in rows]


async def verify(conn: asyncpg.Connection, batch: int = 10_000) -> tuple[int, list[Finding]]:
    """Recompute the chain of looks: (rows checked, findings in chain order)."""
    return await verify_chain(
        conn,
        "data_look",
        lambda row: row_hash(row["seq"], _look(row), row["prev_hash"]),
        lambda row: f"look {row['seq']} by {row['who']}",
        batch,
    )


async def refused_other_office(pool: asyncpg.Pool, reference: str, office: str, who: str) -> None:
    """Someone at ``office`` (a registrar's page, an API client) asked about an event that
    another office recorded: refused as if there were none, and recorded as a look at that
    person's record, so that they see the attempt. A reference nobody recorded is nothing."""
    row = await pool.fetchrow(
        "SELECT event_id, subject_id FROM intake_record WHERE reference = $1 AND registration_office <> $2",
        reference,
        office,
    )
    if row is not None:
        await record_look(
            pool,
            who=who,
            role="registrar",
            action=Action.OTHER_OFFICE,
            reason=f"asked for its progress from {office}",
            subject_ids=[row["subject_id"]],
            event_ids=[row["event_id"]],
            refused=True,
        )
