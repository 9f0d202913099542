"""A receipt tracker that fails gives its partitions back (real broker and database).

When the overdue sweep beside the tracker failed (PostgreSQL restarting), the tracker
used to re-raise that failure before stopping its Kafka consumer. The consumer stayed in
the group, heartbeating, with its partitions assigned and unread: the restarted tracker
never stored the routing decisions on them (seen in the fault suite: 690 deliveries
without a stored decision after a PostgreSQL restart)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from router import tracker
from runtime import kafka
from runtime.access import Principal, grant_components
from runtime.kafka import ensure_topics
from runtime.settings import Settings
from tests.support import eventually

pytestmark = pytest.mark.integration


async def _members(settings: Settings, group: str) -> tuple[str, list[str]]:
    client = kafka.admin(settings, principal=Principal.OPERATOR)
    await client.start()
    try:
        [response] = await client.describe_consumer_groups([group])
    finally:
        await client.close()
    [described] = response.groups
    return described[2], [m[0] for m in described[5]]


async def test_a_tracker_whose_overdue_sweep_fails_leaves_its_group_so_a_restart_reads_every_partition(
    services: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = services.model_copy(update={"topic_prefix": "tf" + uuid.uuid4().hex[:8]})
    await grant_components(settings)
    await ensure_topics(settings, ["dwp"], principal=Principal.OPERATOR)
    group = f"{settings.topic_prefix}.receipt-tracker"

    async def sweep_failing_once_the_tracker_has_joined(
        conn: asyncpg.Connection, default_deadline: timedelta, since: datetime
    ) -> tuple[list[tuple[str, str]], datetime]:
        async def joined() -> bool:
            state, members = await _members(settings, group)
            return state == "Stable" and len(members) == 1

        await eventually(joined, timeout=60, what="the tracker in its consumer group")
        raise ConnectionRefusedError(111, "Connect call failed: PostgreSQL is restarting")

    monkeypatch.setattr(tracker, "flag_overdue", sweep_failing_once_the_tracker_has_joined)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(tracker.run_tracker(settings, pool, asyncio.Event()), timeout=90)

    # It left the group at once; a consumer that had not would hold its partitions for
    # as long as its process lives (its heartbeat goes on).
    state, members = await _members(settings, group)
    assert (state, members) == ("Empty", [])
