"""The reference agency handler used by the local stack and the tests.

It accepts every life event its agency is sent; the SDK's inbox row is the
effect. (Per-agency behaviour — closing a tax record, stopping a pension — is
built on this by each agency.) A consent change that ends consent is recorded
(``agency.consent_withdrawal``), and every event of that type about that person
the agency received is marked as no longer to be processed
(``agency.inbox.consent_withdrawn_at``): the agency was sent them on the basis of
consent only, since the bus tells it of a withdrawal for no other.
"""

from __future__ import annotations

import asyncpg

from consumers.sdk import DeliveredEvent, RejectEvent
from schemas.catalogue import LIFE_EVENTS
from schemas.consent_signatures import CONSENT_CHANGED

CONSENT_ENDS = frozenset({"WITHDRAWN", "REFUSED"})


async def apply_life_event(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    if event.event_type == CONSENT_CHANGED:
        await stop_processing_under_consent(event, conn)
        return
    if event.event_type not in LIFE_EVENTS:
        raise RejectEvent(f"this agency does not handle {event.event_type}")


async def stop_processing_under_consent(event: DeliveredEvent, conn: asyncpg.Connection) -> int:
    """Record a consent change; if it ends consent, stop processing what was received
    under it. Returns how many received events were stopped."""
    change = event.record
    if change["choice"] not in CONSENT_ENDS:
        raise RejectEvent(f"a consent change to {change['choice']} asks nothing of this agency")
    result: str = await conn.execute(
        "UPDATE agency.inbox SET consent_withdrawn_at = now()"
        " WHERE agency = $1 AND subject_id = $2 AND event_type = $3 AND consent_withdrawn_at IS NULL",
        change["agency"],
        change["subject_id"],
        change["event_type"],
    )
    stopped = int(result.rsplit(" ", 1)[-1])
    await conn.execute(
        "INSERT INTO agency.consent_withdrawal (agency, change_id, subject_id, event_type, choice,"
        " recorded_by, recorded_at, events_stopped) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        change["agency"],
        event.event_id,
        change["subject_id"],
        change["event_type"],
        change["choice"],
        change["recorded_by"],
        change["recorded_at"],
        stopped,
    )
    return stopped
