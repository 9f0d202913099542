"""The reference agency handler used by the local stack and the tests.

It accepts every life event its agency is sent; the SDK's inbox row is the
effect. (Per-agency behaviour — closing a tax record, stopping a pension — is
built on this by each agency.) A consent change that ends consent is recorded
(``agency.consent_withdrawal``), and every event of that type about that person
the agency received is marked as no longer to be processed
(``agency.consent_stopped``): the agency subscribes to that type on the basis of
consent, or the bus would not have told it of a withdrawal.
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
    await conn.execute(
        "INSERT INTO agency.consent_withdrawal (agency, change_id, subject_id, event_type, choice,"
        " recorded_by, recorded_at, events_stopped) VALUES ($1, $2, $3, $4, $5, $6, $7, 0)",
        change["agency"],
        event.event_id,
        change["subject_id"],
        change["event_type"],
        change["choice"],
        change["recorded_by"],
        change["recorded_at"],
    )
    result: str = await conn.execute(
        "INSERT INTO agency.consent_stopped (agency, event_id, change_id)"
        " SELECT i.agency, i.event_id, $4 FROM agency.inbox i"
        "  WHERE i.agency = $1 AND i.subject_id = $2 AND i.event_type = $3"
        " ON CONFLICT DO NOTHING",
        change["agency"],
        change["subject_id"],
        change["event_type"],
        event.event_id,
    )
    stopped = int(result.rsplit(" ", 1)[-1])
    await conn.execute(
        "UPDATE agency.consent_withdrawal SET events_stopped = $3 WHERE agency = $1 AND change_id = $2",
        change["agency"],
        event.event_id,
        stopped,
    )
    return stopped
