"""Subscriptions with a history: every version kept, and agencies' own requests to change
theirs, of which a narrowing applies at once and anything wider waits for an operator.

``subscription`` holds the terms in force, which the router reads for each batch, and
names their version; migration 0035's trigger keeps every version in
``subscription_version`` (who, when, why, under which request, in force from and to),
however a row is written. The writers here tell the trigger who and why through
transaction-local settings.

An agency asks for whole terms, not a difference: what it wants to receive of one event
type, on what basis, under what condition, for how long. ``widenings`` compares them
with the terms in force and says, in words, what would need approval.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg

from router.rules import Condition
from runtime.reasons import NotPlainWords, checked_name, checked_reason


class ChangeRefused(ValueError):
    """A request or decision that cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class Terms:
    """What an agency receives of one event type, and on what basis."""

    legal_basis: Literal["statutory", "consent"]
    statute: str | None
    fields: frozenset[str] | None  # None: every field of the event
    condition: Condition = field(default_factory=Condition)
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    status: Literal["active", "suspended"] = "active"

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Terms:
        """From a ``subscription`` or ``subscription_version`` row (condition as text)."""
        condition = row["condition"]
        return cls(
            legal_basis=row["legal_basis"],
            statute=row["statute"],
            fields=None if row["fields"] is None else frozenset(row["fields"]),
            condition=Condition.from_json(json.loads(condition) if condition else None),
            valid_from=row["valid_from"],
            valid_to=row["valid_to"],
            status=row["status"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "legal_basis": self.legal_basis,
            "statute": self.statute,
            "fields": None if self.fields is None else sorted(self.fields),
            "condition": self.condition.to_json(),
            "valid_from": _iso(self.valid_from),
            "valid_to": _iso(self.valid_to),
            "status": self.status,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Terms:
        return cls(
            legal_basis=data["legal_basis"],
            statute=data["statute"],
            fields=None if data["fields"] is None else frozenset(data["fields"]),
            condition=Condition.from_json(data["condition"]),
            valid_from=_moment(data["valid_from"]),
            valid_to=_moment(data["valid_to"]),
            status=data["status"],
        )


def widenings(current: Terms | None, proposed: Terms) -> list[str]:
    """What ``proposed`` gives the agency that ``current`` does not, in words; empty when it
    narrows (or keeps) every term, which then applies without approval."""
    if current is None:
        return ["a new event type"]
    found = []
    if proposed.legal_basis != current.legal_basis:
        found.append(f"legal basis {current.legal_basis} → {proposed.legal_basis}")
    elif proposed.statute != current.statute:
        found.append("a different statute")
    if current.fields is not None:
        if proposed.fields is None:
            found.append("every field")
        elif added := sorted(proposed.fields - current.fields):
            found.append("more fields: " + ", ".join(added))
    found += _wider_condition(current.condition, proposed.condition)
    if current.valid_from is not None and (
        proposed.valid_from is None or proposed.valid_from < current.valid_from
    ):
        found.append("starts earlier")
    if current.valid_to is not None and (proposed.valid_to is None or proposed.valid_to > current.valid_to):
        found.append("ends later")
    if current.status == "suspended" and proposed.status == "active":
        found.append("resumes")
    return found


def _wider_condition(current: Condition, proposed: Condition) -> list[str]:
    found = []
    if current.registered_subjects and not proposed.registered_subjects:
        found.append("everyone, not only registered subjects")
    if current.local_authorities:
        if not proposed.local_authorities:
            found.append("every local authority")
        elif added := sorted(proposed.local_authorities - current.local_authorities):
            found.append("more local authorities: " + ", ".join(added))
    if proposed.postcode_areas != current.postcode_areas and not (
        proposed.postcode_areas and proposed.postcode_areas <= current.postcode_areas
    ):
        found.append("other postcode areas")
    return found


@dataclass(frozen=True)
class Change:
    id: int
    agency: str
    event_type: str
    proposed: Terms
    widens: list[str]
    requested_by: str
    requested_at: datetime
    reason: str
    state: Literal["pending", "applied", "rejected"]
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str | None
    version: int | None  # the version it made, once applied

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Change:
        return cls(
            id=row["id"],
            agency=row["agency"],
            event_type=row["event_type"],
            proposed=Terms.from_json(json.loads(row["proposed"])),
            widens=list(row["widens"]),
            requested_by=row["requested_by"],
            requested_at=row["requested_at"],
            reason=row["reason"],
            state=row["state"],
            decided_by=row["decided_by"],
            decided_at=row["decided_at"],
            decision_reason=row["decision_reason"],
            version=row["version"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_type": self.event_type,
            "proposed": self.proposed.to_json(),
            "needs_approval_for": self.widens,
            "requested_by": self.requested_by,
            "requested_at": self.requested_at.isoformat(),
            "reason": self.reason,
            "state": self.state,
            "decided_by": self.decided_by,
            "decided_at": _iso(self.decided_at),
            "decision_reason": self.decision_reason,
            "version": self.version,
        }


@dataclass(frozen=True)
class Version:
    id: int
    agency: str
    event_type: str
    terms: Terms
    in_force_from: datetime
    in_force_to: datetime | None
    changed_by: str
    approved_by: str | None
    reason: str
    change_id: int | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Version:
        return cls(
            id=row["id"],
            agency=row["agency"],
            event_type=row["event_type"],
            terms=Terms.of(row),
            in_force_from=row["in_force_from"],
            in_force_to=row["in_force_to"],
            changed_by=row["changed_by"],
            approved_by=row["approved_by"],
            reason=row["reason"],
            change_id=row["change_id"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.id,
            "event_type": self.event_type,
            "terms": self.terms.to_json(),
            "in_force_from": self.in_force_from.isoformat(),
            "in_force_to": _iso(self.in_force_to),
            "changed_by": self.changed_by,
            "approved_by": self.approved_by,
            "reason": self.reason,
            "change_id": self.change_id,
        }


def check_words(reason: str, by: str) -> tuple[str, str]:
    """A reason and a name, as they will be kept (and the reason published)."""
    try:
        return checked_reason(reason), checked_name(by)
    except NotPlainWords as exc:
        raise ChangeRefused(str(exc)) from exc


async def write_terms(
    conn: asyncpg.Connection,
    agency: str,
    event_type: str,
    terms: Terms,
    *,
    changed_by: str,
    reason: str,
    approved_by: str | None = None,
    change_id: int | None = None,
) -> int:
    """Put ``terms`` in force (inside the caller's transaction) and return their version."""
    await say_who(conn, changed_by, reason, approved_by=approved_by, change_id=change_id)
    await conn.execute(
        "INSERT INTO subscription (agency, event_type, legal_basis, statute, fields, condition,"
        "                          valid_from, valid_to, status)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)"
        " ON CONFLICT (agency, event_type) DO UPDATE SET legal_basis = EXCLUDED.legal_basis,"
        "   statute = EXCLUDED.statute, fields = EXCLUDED.fields, condition = EXCLUDED.condition,"
        "   valid_from = EXCLUDED.valid_from, valid_to = EXCLUDED.valid_to, status = EXCLUDED.status",
        agency,
        event_type,
        terms.legal_basis,
        terms.statute,
        None if terms.fields is None else sorted(terms.fields),
        json.dumps(condition) if (condition := terms.condition.to_json()) else None,
        terms.valid_from,
        terms.valid_to,
        terms.status,
    )
    # Set by migration 0035's trigger, after the row was written (so not in a RETURNING).
    version: int = await conn.fetchval(
        "SELECT version FROM subscription WHERE agency = $1 AND event_type = $2", agency, event_type
    )
    return version


async def say_who(
    conn: asyncpg.Connection,
    changed_by: str,
    reason: str,
    *,
    approved_by: str | None = None,
    change_id: int | None = None,
) -> None:
    """Tell migration 0035's trigger who changes subscriptions in this transaction, and why."""
    await conn.execute(
        "SELECT set_config('tuo.changed_by', $1, true), set_config('tuo.change_reason', $2, true),"
        "       set_config('tuo.approved_by', $3, true), set_config('tuo.change_id', $4, true)",
        changed_by,
        reason,
        approved_by or "",
        "" if change_id is None else str(change_id),
    )


async def current_terms(conn: asyncpg.Connection, agency: str, event_type: str) -> Terms | None:
    row = await conn.fetchrow(
        "SELECT legal_basis, statute, fields, condition::text AS condition, valid_from, valid_to, status"
        "  FROM subscription WHERE agency = $1 AND event_type = $2 FOR UPDATE",
        agency,
        event_type,
    )
    return None if row is None else Terms.of(row)


async def request_change(
    pool: asyncpg.Pool, agency: str, event_type: str, proposed: Terms, *, requested_by: str, reason: str
) -> Change:
    """An agency asks for ``proposed``: applied at once if it widens nothing, else kept
    waiting for an operator. One request waits at a time per agency and event type."""
    reason, requested_by = check_words(reason, requested_by)
    async with pool.acquire() as conn, conn.transaction():
        current = await current_terms(conn, agency, event_type)
        if current == proposed:
            raise ChangeRefused(f"these are the terms of {agency}'s {event_type} subscription already")
        widens = widenings(current, proposed)
        try:
            change_id: int = await conn.fetchval(
                "INSERT INTO subscription_change (agency, event_type, proposed, widens, requested_by, reason,"
                "                                 state, decided_at, decision_reason)"
                " VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7,"
                "         CASE WHEN $7 = 'applied' THEN clock_timestamp() END,"
                "         CASE WHEN $7 = 'applied' THEN 'narrows only: applied at once' END)"
                " RETURNING id",
                agency,
                event_type,
                json.dumps(proposed.to_json()),
                widens,
                requested_by,
                reason,
                "pending" if widens else "applied",
            )
        except asyncpg.UniqueViolationError as exc:
            raise ChangeRefused(
                f"a change to {agency}'s {event_type} subscription is already waiting for approval;"
                " wait for an operator's decision on it"
            ) from exc
        if not widens:
            await write_terms(
                conn,
                agency,
                event_type,
                proposed,
                changed_by=requested_by,
                reason=reason,
                change_id=change_id,
            )
        return await _change(conn, change_id)


async def approve(pool: asyncpg.Pool, change_id: int, *, by: str, reason: str) -> Change:
    """Put a waiting request's terms in force from now; its version names who asked, who
    approved and why."""
    reason, by = check_words(reason, by)
    async with pool.acquire() as conn, conn.transaction():
        change = await _waiting(conn, change_id)
        await current_terms(conn, change.agency, change.event_type)  # locks the row, if any
        await write_terms(
            conn,
            change.agency,
            change.event_type,
            change.proposed,
            changed_by=change.requested_by,
            reason=change.reason,
            approved_by=by,
            change_id=change.id,
        )
        await _decide(conn, change.id, "applied", by, reason)
        return await _change(conn, change.id)


Decider = Callable[..., Awaitable[Change]]


async def reject(pool: asyncpg.Pool, change_id: int, *, by: str, reason: str) -> Change:
    reason, by = check_words(reason, by)
    async with pool.acquire() as conn, conn.transaction():
        await _waiting(conn, change_id)
        await _decide(conn, change_id, "rejected", by, reason)
        return await _change(conn, change_id)


async def _waiting(conn: asyncpg.Connection, change_id: int) -> Change:
    row = await conn.fetchrow(
        f"{_CHANGES} WHERE c.id = $1 FOR UPDATE OF c",
        change_id,
    )
    if row is None:
        raise ChangeRefused(f"there is no subscription change {change_id}; see `tuo subscriptions changes`")
    change = Change.of(row)
    if change.state != "pending":
        raise ChangeRefused(
            f"change {change_id} was {change.state} already"
            + (f" by {change.decided_by}" if change.decided_by else "")
            + (f" at {change.decided_at:%Y-%m-%d %H:%M} UTC" if change.decided_at else "")
        )
    return change


async def _decide(conn: asyncpg.Connection, change_id: int, state: str, by: str, reason: str) -> None:
    await conn.execute(
        "UPDATE subscription_change SET state = $2, decided_by = $3, decided_at = clock_timestamp(),"
        " decision_reason = $4 WHERE id = $1",
        change_id,
        state,
        by,
        reason,
    )


_CHANGES = (
    "SELECT c.id, c.agency, c.event_type, c.proposed::text AS proposed, c.widens, c.requested_by,"
    "       c.requested_at, c.reason, c.state, c.decided_by, c.decided_at, c.decision_reason,"
    "       (SELECT v.id FROM subscription_version v WHERE v.change_id = c.id) AS version"
    "  FROM subscription_change c"
)


async def _change(conn: asyncpg.Connection, change_id: int) -> Change:
    return Change.of(await conn.fetchrow(f"{_CHANGES} WHERE c.id = $1", change_id))


async def changes(
    conn: asyncpg.Pool | asyncpg.Connection, *, agency: str | None = None, pending_only: bool = True
) -> list[Change]:
    """Requests, oldest first: those waiting, or every one."""
    rows = await conn.fetch(
        f"{_CHANGES} WHERE ($1::text IS NULL OR c.agency = $1) AND (NOT $2 OR c.state = 'pending')"
        " ORDER BY c.id",
        agency,
        pending_only,
    )
    return [Change.of(r) for r in rows]


async def history(
    conn: asyncpg.Pool | asyncpg.Connection, agency: str, event_type: str | None = None
) -> list[Version]:
    """Every version of the agency's subscriptions, by event type, oldest first."""
    rows = await conn.fetch(
        "SELECT id, agency, event_type, fields, legal_basis, statute, condition::text AS condition,"
        "       valid_from, valid_to, status, in_force_from, in_force_to, changed_by, approved_by,"
        "       reason, change_id"
        "  FROM subscription_version WHERE agency = $1 AND ($2::text IS NULL OR event_type = $2)"
        " ORDER BY event_type, id",
        agency,
        event_type,
    )
    return [Version.of(r) for r in rows]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _moment(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
