"""`tuo lag`: how far each consumer group is behind, per agency, measured as the
operators' Kafka user against read_committed end offsets."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from aiokafka.structs import TopicPartition

from operators.lag import PartitionLag
from operators.services import RunningBus
from runtime import kafka
from runtime.access import agency_principal, onboard_agency
from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import inspector_producer, tuo_cli

pytestmark = pytest.mark.integration


async def _tuo(settings: Settings, *args: str) -> tuple[int, str]:
    """`tuo …` in-process, off the event loop (the command runs its own)."""
    return await asyncio.to_thread(tuo_cli, settings, *args)


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if f" {name} " in line)


async def test_lag_shows_an_agencys_backlog_until_it_reads_and_commits(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool
) -> None:
    # The bus runs the consumers of the agencies subscribed when it started: none for this one.
    agency = f"lag-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")  # no consumer runs for it
    topic = Topics(services.topic_prefix).agency(agency)
    group = f"{services.topic_prefix}.agency.{agency}"

    code, out = await _tuo(services, "lag", "--agency", agency)
    assert code == 0, out
    assert "not started, nothing to read" in _row(out, agency)

    producer = inspector_producer(services)
    await producer.start()
    try:
        for n in range(5):
            await producer.send_and_wait(topic, value=f"event {n}".encode(), key=b"k")
    finally:
        await producer.stop()
    code, out = await _tuo(services, "lag", "--agency", agency)
    row = _row(out, agency)
    assert code == 0 and group in row and "not started" in row and " 5 " in row, out

    # The agency reads two and commits, as its SDK would: three to go.
    consumer = kafka.consumer(
        services, topic, principal=agency_principal(agency), group_id=group, client_id="lag-test"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        await consumer.commit({tp: 2})
        code, out = await _tuo(services, "lag", "--agency", agency)
        row = _row(out, agency)
        assert code == 0 and "behind" in row and " 3 " in row and f"{topic}:0 2/5" in row, out
        await consumer.commit({tp: 5})
    finally:
        await consumer.stop()
    code, out = await _tuo(services, "lag", "--agency", agency)
    row = _row(out, agency)
    assert code == 0 and "caught up" in row and " 0 " in row and f"{topic}:0 5/5" in row, out


async def test_lag_covers_the_router_the_tracker_and_every_agency(
    services: Settings, pool: asyncpg.Pool
) -> None:
    code, out = await _tuo(services, "lag")
    assert code == 0, out
    prefix = services.topic_prefix
    assert f"{prefix}.router" in _row(out, "router")
    assert f"{prefix}.receipt-tracker" in _row(out, "receipt tracker")
    for agency in ("hmrc", "dwp", "dvla", "council-leeds"):
        assert f"{prefix}.agency.{agency}" in _row(out, agency)


@pytest.mark.parametrize("agency", ["nobody-at-all", "../etc", "", "[red]x[/]", "a" * 500])
async def test_lag_for_an_unknown_agency_is_a_clear_error(
    services: Settings, pool: asyncpg.Pool, agency: str
) -> None:
    code, out = await _tuo(services, "lag", "--agency", agency)
    assert code == 1, out
    assert any(line.startswith("Error: no agency") for line in out.splitlines()), out
    assert "has a subscription" in out and "Traceback" not in out, out


def test_a_caught_up_group_on_a_transactional_topic_is_one_marker_short() -> None:
    from operators.lag import GroupLag, Reader

    reader = Reader("dwp", "tuo.agency.dwp", ("tuo.agency.dwp",), frozenset({"tuo.agency.dwp"}), agency=True)
    caught_up = GroupLag(reader, [PartitionLag("tuo.agency.dwp", 0, committed=41, end=42, start=0)])
    assert caught_up.state == "caught up" and caught_up.lag == 1 and caught_up.pending == 0
    behind = GroupLag(reader, [PartitionLag("tuo.agency.dwp", 0, committed=41, end=44, start=0)])
    assert behind.state == "behind" and behind.pending == 3
    never = GroupLag(reader, [PartitionLag("tuo.agency.dwp", 0, committed=None, end=44, start=4)])
    assert never.state == "not started" and never.lag == 40
