"""The router's queries: subscriptions, and consent as it stands right now."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from router.rules import ConsentState, Subscription


async def load_subscriptions(conn: asyncpg.Pool | asyncpg.Connection) -> list[Subscription]:
    rows = await conn.fetch(
        "SELECT agency, event_type, legal_basis, statute, valid_from, valid_to, status  FROM subscription"
    )
    return [Subscription(**dict(r)) for r in rows]


async def current_consent(
    conn: asyncpg.Pool | asyncpg.Connection, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, ConsentState]]:
    """(subject_id, event_type) → agency → current choice."""
    wanted = sorted(set(pairs))
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT c.subject_id, c.event_type, c.agency, c.choice FROM current_consent c"
        "  JOIN unnest($1::text[], $2::text[]) AS w(subject_id, event_type)"
        "    USING (subject_id, event_type)",
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
