"""Agencies' registrations of interest in people (the Dutch BRP's afnemersindicatie).

An agency registers the people it holds records for, by National Insurance number, and
can withdraw them. Each NINO is turned into the pseudonymous subject id the bus keys
that person's events by (``runtime.pseudonyms``) and only that id is kept. A
subscription scoped to registered subjects (``Condition.registered_subjects``) tells the
agency only of them; everyone else's events are withheld from it as not of interest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from runtime.pseudonyms import subject_id_for
from schemas.validation import normalise_nino

MAX_PER_REQUEST = 10_000


class NotANino(ValueError):
    """Some of the values given are not NINOs; which ones, by position (never the value)."""

    def __init__(self, positions: list[int]) -> None:
        shown = ", ".join(str(p) for p in positions[:20]) + (" …" if len(positions) > 20 else "")
        super().__init__(f"not a National Insurance number: item(s) {shown}; nothing was changed")
        self.positions = positions


@dataclass(frozen=True)
class InterestChange:
    registered: int  # newly registered (or registered again after a withdrawal)
    withdrawn: int  # registrations withdrawn now
    unchanged: int  # already as asked


def subject_ids(ninos: Iterable[str], key: bytes) -> list[str]:
    """The subject ids of ``ninos`` (validated first: one bad value changes nothing)."""
    normalised: list[str] = []
    bad: list[int] = []
    for n, nino in enumerate(ninos, 1):
        try:
            normalised.append(normalise_nino(nino))
        except ValueError:
            bad.append(n)
    if bad:
        raise NotANino(bad)
    return sorted({subject_id_for(nino, key) for nino in normalised})


async def change_interest(
    pool: asyncpg.Pool, agency: str, *, register: list[str], withdraw: list[str], by: str
) -> InterestChange:
    """Register and withdraw subject ids for ``agency`` in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        registered = await conn.fetchval(
            "WITH added AS ("
            " INSERT INTO agency_interest (agency, subject_id, registered_by) SELECT $1, s, $3"
            "   FROM unnest($2::text[]) AS s"
            " ON CONFLICT (agency, subject_id) DO UPDATE SET registered_at = now(), registered_by = $3,"
            "   withdrawn_at = NULL, withdrawn_by = NULL WHERE agency_interest.withdrawn_at IS NOT NULL"
            " RETURNING 1) SELECT count(*) FROM added",
            agency,
            register,
            by,
        )
        withdrawn = await conn.fetchval(
            "WITH gone AS ("
            " UPDATE agency_interest SET withdrawn_at = now(), withdrawn_by = $3"
            "  WHERE agency = $1 AND subject_id = ANY($2::text[]) AND withdrawn_at IS NULL RETURNING 1)"
            " SELECT count(*) FROM gone",
            agency,
            withdraw,
            by,
        )
    return InterestChange(registered, withdrawn, len(register) + len(withdraw) - registered - withdrawn)


async def interest_count(pool: asyncpg.Pool, agency: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM agency_interest WHERE agency = $1 AND withdrawn_at IS NULL", agency
    )
    return count
