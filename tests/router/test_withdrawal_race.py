"""The withdrawal guarantee: once a withdrawal is confirmed, no routing decision
that starts afterwards delivers to that agency — raced against a live stream of
events for the same person."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import asyncpg
import pytest

from operators.services import RunningBus
from router.store import record_consent
from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import death_message, eventually, header, inspector_producer, office_key, read_topic

pytestmark = pytest.mark.integration


async def test_nothing_decided_after_a_confirmed_withdrawal_reaches_the_agency(
    bus: RunningBus, pool: asyncpg.Pool, services: Settings
) -> None:
    subject_id = f"s-race-{uuid.uuid4().hex}"
    await record_consent(
        pool,
        subject_id=subject_id,
        agency="dvla",
        event_type="DeathRegistered",
        choice="given",
        recorded_by="informant",
    )
    topics = Topics(services.topic_prefix)
    key = await office_key(pool, services)
    producer = inspector_producer(services, linger_ms=0)
    await producer.start()
    sent: list[str] = []
    confirmed_at: datetime | None = None

    async def decided(event_ids: list[str]) -> list[asyncpg.Record] | None:
        rows = await pool.fetch(
            "SELECT event_id::text, outcome, decided_at FROM routing_decision"
            " WHERE agency = 'dvla' AND event_id = ANY($1::uuid[])",
            event_ids,
        )
        return rows if len(rows) == len(event_ids) else None

    try:
        for i in range(120):
            event_id, value, headers = death_message(subject_id, key=key)
            await producer.send_and_wait(topics.life_events, value, key=subject_id.encode(), headers=headers)
            sent.append(event_id)
            if i == 20:  # the router is live and delivering before the race starts
                await eventually(lambda: decided(list(sent)), timeout=60, what="the first decisions")
            if i == 60:
                confirmed_at = await record_consent(
                    pool,
                    subject_id=subject_id,
                    agency="dvla",
                    event_type="DeathRegistered",
                    choice="withdrawn",
                    recorded_by="citizen",
                )
            await asyncio.sleep(0.01)
    finally:
        await producer.stop()
    assert confirmed_at is not None

    decisions = await eventually(lambda: decided(sent), timeout=60, what="dvla decisions for every event")
    after = [d for d in decisions if d["decided_at"] > confirmed_at]
    before = [d for d in decisions if d["decided_at"] <= confirmed_at]
    assert after, "the stream went on after the withdrawal"
    assert all(d["outcome"] == "WITHHELD_NO_CONSENT" for d in after)
    assert any(d["outcome"] == "DELIVERED" for d in before), "consent was given before the withdrawal"
    delivered_to_dvla = {header(r, "ce_id") for r in await read_topic(services, topics.agency("dvla"))}
    assert not {d["event_id"] for d in after} & delivered_to_dvla, (
        "an event decided after withdrawal reached dvla"
    )
    print(f"\n{len(before)} decided before the withdrawal was confirmed, {len(after)} after; none delivered")
