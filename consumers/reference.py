"""The reference agency handler used by the local stack and the tests.

It accepts every life event its agency is sent; the SDK's inbox row is the
effect. (Per-agency behaviour — closing a tax record, stopping a pension — is
built on this by each agency.)
"""

from __future__ import annotations

import asyncpg

from consumers.sdk import DeliveredEvent, RejectEvent
from schemas.catalogue import LIFE_EVENTS


async def apply_life_event(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    if event.event_type not in LIFE_EVENTS:
        raise RejectEvent(f"this agency does not handle {event.event_type}")
