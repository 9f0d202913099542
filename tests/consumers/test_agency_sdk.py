"""The agency SDK against the real database and broker: each event applied once,
rejections and failing handlers answered with receipts, nothing dropped."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from consumers import sdk
from consumers.sdk import AgencyConsumer, DeliveredEvent, HandlerFailed, RejectEvent
from runtime.access import Principal, onboard_agency
from runtime.kafka import TopicCreationFailed, Topics, ensure_topics
from runtime.settings import Settings
from schemas import decode
from tests.support import death_registration, eventually, header, inspector_producer, read_topic

pytestmark = pytest.mark.integration


def _event() -> DeliveredEvent:
    return DeliveredEvent(event_id=str(uuid.uuid4()), event_type="DeathRegistered", record={})


@pytest.fixture
async def effects(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute("CREATE TABLE IF NOT EXISTS test_effect (agency text, event_id uuid)")
    return pool


async def _effects(pool: asyncpg.Pool, event: DeliveredEvent) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM test_effect WHERE event_id = $1", uuid.UUID(event.event_id)
    )
    return count


async def _apply(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    await asyncio.sleep(0.2)  # long enough for a racing claimant to arrive
    await conn.execute("INSERT INTO test_effect VALUES ('test', $1)", uuid.UUID(event.event_id))


async def test_redelivered_event_is_applied_once_and_gets_the_first_receipt(effects: asyncpg.Pool) -> None:
    event = _event()
    first = await sdk.handle_once(effects, "test-agency", event, _apply)
    again = await sdk.handle_once(effects, "test-agency", event, _apply)
    assert (first.outcome, again.outcome) == ("APPLIED", "APPLIED")
    assert await _effects(effects, event) == 1


async def test_two_consumers_racing_on_one_event_apply_it_once(effects: asyncpg.Pool) -> None:
    event = _event()
    receipts = await asyncio.gather(
        sdk.handle_once(effects, "test-agency", event, _apply),
        sdk.handle_once(effects, "test-agency", event, _apply),
    )
    assert [r.outcome for r in receipts] == ["APPLIED", "APPLIED"]
    assert await _effects(effects, event) == 1


async def test_rejection_undoes_the_handlers_work_and_is_remembered(effects: asyncpg.Pool) -> None:
    event = _event()

    async def reject_after_writing(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await conn.execute("INSERT INTO test_effect VALUES ('test', $1)", uuid.UUID(event.event_id))
        raise RejectEvent("no record of this person")

    receipt = await sdk.handle_once(effects, "test-agency", event, reject_after_writing)
    assert (receipt.outcome, receipt.reason) == ("REJECTED", "no record of this person")
    assert await _effects(effects, event) == 0
    again = await sdk.handle_once(effects, "test-agency", event, _apply)
    assert (again.outcome, again.reason) == ("REJECTED", "no record of this person")
    assert await _effects(effects, event) == 0


async def test_a_rejection_in_a_batch_undoes_only_that_events_work(effects: asyncpg.Pool) -> None:
    events = [_event() for _ in range(3)]

    async def reject_the_second(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await conn.execute("INSERT INTO test_effect VALUES ('test', $1)", uuid.UUID(event.event_id))
        if event.event_id == events[1].event_id:
            raise RejectEvent("no record of this person")

    receipts = await sdk.apply_batch(effects, "test-agency", events, sdk.EachInTurn(reject_the_second))

    assert [(receipts[e.event_id].outcome, receipts[e.event_id].reason) for e in events] == [
        ("APPLIED", None),
        ("REJECTED", "no record of this person"),
        ("APPLIED", None),
    ]
    assert [await _effects(effects, e) for e in events] == [1, 0, 1]
    again = await sdk.apply_batch(effects, "test-agency", events, sdk.EachInTurn(reject_the_second))
    assert [again[e.event_id].outcome for e in events] == ["APPLIED", "REJECTED", "APPLIED"]
    assert [await _effects(effects, e) for e in events] == [1, 0, 1], (
        "a batch seen again is not applied again"
    )


async def test_failing_handler_is_retried_then_rejected_without_its_message(
    effects: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "HANDLER_BACKOFF_SECONDS", 0.01)
    calls = 0

    async def broken(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("agency ledger for Pat Example is offline")

    event = _event()
    with pytest.raises(HandlerFailed, match="handler failed 3 times: ConnectionError"):
        await sdk.handle_with_retries(effects, "test-agency", event, broken)
    assert calls == 3
    stored = await effects.fetchrow(
        "SELECT outcome, reason FROM agency.inbox WHERE event_id = $1", uuid.UUID(event.event_id)
    )
    assert stored["outcome"] == "REJECTED"
    assert "Pat Example" not in stored["reason"], "the exception's text may hold personal data"


async def test_agency_with_a_broken_handler_sends_rejected_receipts_and_dead_letters(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sdk, "HANDLER_BACKOFF_SECONDS", 0.01)
    topics = Topics(services.topic_prefix)
    await onboard_agency(services, pool, "test-broken", [], by="tests")
    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()

    async def delivered_to_dwp() -> Any:
        records = await read_topic(services, topics.agency("dwp"))
        return next((r for r in records if header(r, "ce_id") == accepted["event_id"]), None)

    message = await eventually(delivered_to_dwp, what="the event on dwp's topic")
    producer = inspector_producer(services)
    await producer.start()
    await producer.send_and_wait(
        topics.agency("test-broken"), value=message.value, key=message.key, headers=list(message.headers)
    )
    await producer.stop()

    async def broken(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        raise RuntimeError("downstream unavailable")

    stop = asyncio.Event()
    consumer = asyncio.create_task(AgencyConsumer(services, pool, "test-broken", broken).run(stop))
    try:

        async def rejected_receipt() -> Any:
            for record in await read_topic(services, topics.receipts("test-broken")):
                receipt = decode(record.value or b"")[1]
                if str(receipt["event_id"]) == accepted["event_id"]:
                    return receipt
            return None

        receipt = await eventually(rejected_receipt, timeout=60, what="a rejected receipt")
        assert receipt["outcome"] == "REJECTED"
        assert receipt["reason"] == "handler failed 3 times: RuntimeError"
        letters = [
            r
            for r in await read_topic(services, topics.agency_dead_letters("test-broken"))
            if header(r, "ce_id") == accepted["event_id"]
            and header(r, "tuo_dlq_component") == "agency:test-broken"
        ]
        assert len(letters) == 1 and letters[0].value == message.value
    finally:
        stop.set()
        await consumer


async def test_topic_creation_refused_by_the_broker_is_an_error_not_silence(services: Settings) -> None:
    impossible = services.model_copy(
        update={"topic_prefix": "rf3-" + uuid.uuid4().hex[:8], "topic_replication_factor": 3}
    )
    with pytest.raises(TopicCreationFailed, match="replication factor"):
        await ensure_topics(impossible, ["dwp"], principal=Principal.OPERATOR)


async def test_an_agency_on_several_partitions_applies_each_event_once_across_its_consumers(
    services: Settings, pool: asyncpg.Pool, effects: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    """TUO_AGENCY_PARTITIONS: an agency's topic with two partitions, read by two consumers
    in its one group (the Kafka way an agency goes faster): every event applied once and
    receipted, whichever consumer had its partition."""
    split = services.model_copy(update={"agency_partitions": 2})
    topics = Topics(split.topic_prefix)
    agency = "test-split-" + uuid.uuid4().hex[:6]
    await onboard_agency(split, pool, agency, [], by="tests")
    wanted = set()
    for _ in range(6):
        answer = await intake.post("/v1/death-registrations", json=death_registration())
        assert answer.status_code == 201, answer.text
        wanted.add(answer.json()["event_id"])

    async def delivered_to_dwp() -> list[Any] | None:
        found = [r for r in await read_topic(services, topics.agency("dwp")) if header(r, "ce_id") in wanted]
        return found if len(found) == len(wanted) else None

    messages = await eventually(delivered_to_dwp, what="six events on dwp's topic")
    producer = inspector_producer(services)
    await producer.start()
    try:
        for n, message in enumerate(messages):  # three on each partition
            await producer.send_and_wait(
                topics.agency(agency),
                value=message.value,
                key=message.key,
                headers=list(message.headers),
                partition=n % 2,
            )
    finally:
        await producer.stop()

    def recorded_by(consumer: str) -> Any:
        async def record(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
            await conn.execute("INSERT INTO test_effect VALUES ($1, $2)", consumer, uuid.UUID(event.event_id))

        return record

    stop = asyncio.Event()
    consumers = [
        asyncio.create_task(AgencyConsumer(split, pool, agency, recorded_by(name)).run(stop))
        for name in ("first", "second")
    ]
    try:

        async def all_receipted() -> set[str] | None:
            found = set()
            for record in await read_topic(services, topics.receipts(agency)):
                receipt = decode(record.value or b"")[1]
                if receipt["outcome"] == "APPLIED":
                    found.add(str(receipt["event_id"]))
            return found if found >= wanted else None

        await eventually(all_receipted, timeout=60, what="an APPLIED receipt for each event")
    finally:
        stop.set()
        await asyncio.gather(*consumers)
    applied = await pool.fetch(
        "SELECT event_id::text, count(*) AS times FROM test_effect WHERE event_id = ANY($1::uuid[])"
        " GROUP BY event_id",
        list(wanted),
    )
    assert {row["event_id"]: row["times"] for row in applied} == dict.fromkeys(wanted, 1)
