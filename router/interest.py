"""Agencies' registrations of interest in people (the Dutch BRP's afnemersindicatie).

An agency registers the people it holds records for, by National Insurance number, and
can withdraw them (a withdrawal deletes the registration). Each NINO is turned into the
pseudonymous subject id the bus keys that person's events by (``runtime.pseudonyms``)
and only that id is kept. A subscription scoped to registered subjects
(``Condition.registered_subjects``) tells the agency only of them; everyone else's events
are withheld from it as not of interest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import structlog

from runtime.pseudonyms import subject_id_for
from schemas.validation import normalise_nino

log = structlog.get_logger(__name__)

MAX_PER_REQUEST = 10_000


class NotANino(ValueError):
    """Some of the values given are not NINOs; which ones, by position (never the value)."""

    def __init__(self, positions: list[int]) -> None:
        shown = ", ".join(str(p) for p in positions[:20]) + (" …" if len(positions) > 20 else "")
        super().__init__(f"not a National Insurance number: item(s) {shown}; nothing was changed")
        self.positions = positions


@dataclass(frozen=True)
class InterestChange:
    registered: int  # newly registered
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
            "   FROM unnest($2::text[]) AS s ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT count(*) FROM added",
            agency,
            register,
            by,
        )
        # Withdrawn means forgotten: the agency no longer holds the record, so the bus no
        # longer keeps that it did (how many, and by whom, go to the log).
        withdrawn = await conn.fetchval(
            "WITH gone AS (DELETE FROM agency_interest WHERE agency = $1 AND subject_id = ANY($2::text[])"
            " RETURNING 1) SELECT count(*) FROM gone",
            agency,
            withdraw,
        )
    log.info("interest_changed", agency=agency, registered=registered, withdrawn=withdrawn, by=by)
    return InterestChange(registered, withdrawn, len(register) + len(withdraw) - registered - withdrawn)


async def interest_count(pool: asyncpg.Pool, agency: str) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM agency_interest WHERE agency = $1", agency)
    return count
