"""Exactly-once fan-out under faults, against the real broker: router processes
killed with SIGKILL at random moments, and a second router taking over
partitions mid-stream. Every agency topic must hold each event it is entitled
to exactly once (counted by ce_id, read_committed) and nothing else."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError

from operators.services import supervise
from producers.office_keys import SigningKey
from router import service
from runtime.access import Principal, grant_components
from runtime.kafka import Topics, ensure_topics
from runtime.settings import Settings
from tests.conftest import PROJECT
from tests.router.test_tracker_failure import _members
from tests.support import (
    child_pids,
    death_message,
    eventually,
    header,
    inspector_producer,
    kafka_env,
    office_key,
    read_topic,
)

pytestmark = pytest.mark.integration

ENTITLED = ("hmrc", "dwp", "council-leeds")  # statutory; the example address is in Leeds
NOT_ENTITLED = ("dvla", "hmpo", "council-bradford")  # consent never given / outside the area


async def _isolated(services: Settings) -> Settings:
    """Same broker and database, own topics: this test's routers share nothing with the bus's
    (a second deployment on the cluster, with its components' ACLs for its own prefix)."""
    settings = services.model_copy(update={"topic_prefix": "eo" + uuid.uuid4().hex[:8]})
    await grant_components(settings)
    return settings


async def _stream(settings: Settings, count: int, per_second: float, key: SigningKey) -> list[str]:
    producer = inspector_producer(settings, enable_idempotence=True)
    await producer.start()
    sent = []
    try:
        for _ in range(count):
            subject_id = f"s-{uuid.uuid4().hex}"
            event_id, value, headers = death_message(subject_id, key=key)
            await producer.send_and_wait(
                Topics(settings.topic_prefix).life_events, value, key=subject_id.encode(), headers=headers
            )
            sent.append(event_id)
            await asyncio.sleep(1 / per_second)
    finally:
        await producer.stop()
    return sent


def _start_router(
    settings: Settings, log: Path, processes: int | None = None, components: tuple[str, ...] = ("router",)
) -> subprocess.Popen[bytes]:
    assert settings.database_url is not None and settings.pseudonym_key is not None
    env = {
        **({} if processes is None else {"TUO_ROUTER_PROCESSES": str(processes)}),
        **({} if len(components) == 1 else {"TUO_PROCESS_PER_COMPONENT": "true"}),
        **os.environ,
        **kafka_env(settings),
        "TUO_DATABASE_URL": settings.database_url.get_secret_value(),
        "TUO_PSEUDONYM_KEY": settings.pseudonym_key.get_secret_value(),
        "TUO_TOPIC_PREFIX": settings.topic_prefix,
        "TUO_STATE_DIR": str(log.parent / "no-stack"),
        "TUO_LOG_LEVEL": "INFO",  # kept in the test's tmp dir: the first place to look on failure
    }
    tuo = str(Path(sys.executable).parent / "tuo")
    return subprocess.Popen(
        [tuo, "run", *components], cwd=PROJECT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


async def _assert_exactly_once(settings: Settings, sent: list[str]) -> dict[str, int]:
    topics = Topics(settings.topic_prefix)

    async def all_delivered() -> bool:
        for agency in ENTITLED:
            seen = {header(r, "ce_id") for r in await read_topic(settings, topics.agency(agency))}
            if not set(sent) <= seen:
                return False
        return True

    await eventually(all_delivered, timeout=120, what=f"{len(sent)} events at {ENTITLED}")
    counts = {}
    for agency in ENTITLED:
        ids = Counter(header(r, "ce_id") for r in await read_topic(settings, topics.agency(agency)))
        duplicates = {event_id: n for event_id, n in ids.items() if n > 1}
        assert not duplicates, f"{agency} received {len(duplicates)} events more than once"
        assert set(ids) == set(sent), f"{agency} received events nobody sent"
        counts[agency] = sum(ids.values())
    for agency in NOT_ENTITLED:
        assert await read_topic(settings, topics.agency(agency)) == [], f"{agency} is not entitled"
    decisions = await read_topic(settings, topics.routing_decisions)
    counted = Counter(header(r, "ce_id") for r in decisions)
    repeated = [
        (header(r, "ce_id"), r.partition, r.offset) for r in decisions if counted[header(r, "ce_id")] > 1
    ]
    assert not repeated, f"decisions recorded more than once: {repeated[:6]}"
    return counts


async def test_router_killed_at_random_moments_delivers_each_event_exactly_once(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    log = tmp_path / "router.log"
    router = _start_router(settings, log)
    kills = 0
    streaming = asyncio.create_task(
        _stream(settings, count=300, per_second=60, key=await office_key(pool, services))
    )
    try:
        while not streaming.done() and kills < 3:
            await asyncio.sleep(random.uniform(0.8, 2.0))
            router.send_signal(signal.SIGKILL)
            await asyncio.to_thread(router.wait)
            kills += 1
            router = _start_router(settings, log)
        sent = await streaming
        counts = await _assert_exactly_once(settings, sent)
    finally:
        router.send_signal(signal.SIGTERM)
        await asyncio.to_thread(router.wait, 30)
    assert kills == 3, "the router was killed three times mid-stream"
    assert counts == {agency: 300 for agency in ENTITLED}
    print(
        f"\nSIGKILLed the router {kills} times during 300 events; each entitled agency got each exactly once"
    )


async def test_second_router_takes_over_mid_stream_without_loss_or_duplicates(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    first = _start_router(settings, tmp_path / "first.log")
    second = _start_router(settings, tmp_path / "second.log")
    streaming = asyncio.create_task(
        _stream(settings, count=300, per_second=60, key=await office_key(pool, services))
    )
    try:

        async def first_is_routing() -> bool:
            return "router_partitions_assigned" in (tmp_path / "first.log").read_text(errors="replace")

        # SIGTERM before the router has installed its handlers would kill, not stop, it.
        await eventually(first_is_routing, timeout=60, what="the first router to take partitions")
        await asyncio.sleep(1.0)
        first.send_signal(signal.SIGTERM)  # a graceful stop: its partitions move to the second
        assert await asyncio.to_thread(first.wait, 60) == 0
        sent = await streaming
        counts = await _assert_exactly_once(settings, sent)
    finally:
        for router in (first, second):
            if router.poll() is None:
                router.send_signal(signal.SIGTERM)
                await asyncio.to_thread(router.wait, 30)
    assert counts == {agency: 300 for agency in ENTITLED}


async def test_a_router_stuck_on_a_batch_restarts_and_then_delivers_it_exactly_once(
    services: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka can wait for ever on a transaction across a broker restart; the router gives
    up on a batch after STUCK_SECONDS, its supervisor starts it again, and the batch is
    routed by the new router: late, but once."""
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    monkeypatch.setattr(service, "STUCK_SECONDS", 10.0)
    commit = service.Router._commit
    stuck: list[int] = []

    async def stuck_the_first_time(self: service.Router, planned: service.Planned) -> None:
        if not stuck:
            stuck.append(len(planned.outgoing))
            await asyncio.Event().wait()  # a commit that never returns
        await commit(self, planned)

    monkeypatch.setattr(service.Router, "_commit", stuck_the_first_time)
    stop = asyncio.Event()
    running = asyncio.create_task(
        supervise("router", lambda stop: service.run_router(settings, pool, stop), stop)
    )
    try:
        sent = await _stream(settings, count=30, per_second=30, key=await office_key(pool, services))
        counts = await _assert_exactly_once(settings, sent)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)
    assert stuck, "the router never met the stuck batch"
    assert counts == {agency: 30 for agency in ENTITLED}


async def test_tuo_run_routes_in_several_processes_which_die_with_it(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """`tuo run router` with TUO_ROUTER_PROCESSES=2: a second router in a child process, in
    the same group, sharing the work exactly once; a SIGKILL of `tuo run` takes it too."""
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    parent = _start_router(settings, tmp_path / "router.log", processes=2)
    try:

        async def two_routers_in_the_group() -> bool:
            try:
                state, members = await _members(settings, f"{settings.topic_prefix}.router")
            except GroupCoordinatorNotAvailableError:
                return False  # no member has joined yet
            return state == "Stable" and len(members) == 2

        await eventually(two_routers_in_the_group, timeout=90, what="two routers in the router's group")
        [child] = child_pids(parent.pid)
        sent = await _stream(settings, count=120, per_second=60, key=await office_key(pool, services))
        counts = await _assert_exactly_once(settings, sent)
        assert counts == {agency: 120 for agency in ENTITLED}

        parent.send_signal(signal.SIGKILL)
        await asyncio.to_thread(parent.wait)

        async def child_gone() -> bool:
            return not Path(f"/proc/{child}").exists()

        await eventually(child_gone, timeout=15, what="the child router to die with `tuo run`")
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGTERM)
            await asyncio.to_thread(parent.wait, 30)


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # gone meanwhile


async def test_tuo_run_gives_each_component_a_child_it_restarts_and_stops_on_ctrl_c(
    services: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """`tuo run router tracker` with TUO_PROCESS_PER_COMPONENT: each component in a child
    process of its own. A router
    child SIGKILLed mid-stream is started again by `tuo run`, and every event still
    reaches every entitled agency exactly once; Ctrl-C then stops every child."""
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    parent = _start_router(settings, tmp_path / "bus.log", components=("router", "tracker"))
    try:

        async def routers() -> list[int] | None:
            found = [pid for pid in child_pids(parent.pid) if b"router" in _command_line(pid)]
            return found or None

        async def both_children() -> list[int] | None:
            found = child_pids(parent.pid)
            return found if len(found) == 2 else None

        children = await eventually(both_children, timeout=60, what="a child for the router and the tracker")
        [router] = await eventually(routers, what="the router's child")
        key = await office_key(pool, services)
        sent = await _stream(settings, count=40, per_second=40, key=key)
        os.kill(router, signal.SIGKILL)

        async def another_router() -> list[int] | None:
            found = [pid for pid in await routers() or [] if pid != router]
            return found or None

        [restarted] = await eventually(another_router, timeout=60, what="`tuo run` to start the router again")
        sent += await _stream(settings, count=40, per_second=40, key=key)
        counts = await _assert_exactly_once(settings, sent)
        assert counts == {agency: 80 for agency in ENTITLED}

        parent.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(parent.wait, 60) == 0
        left = [pid for pid in [*children, restarted] if pid != router and Path(f"/proc/{pid}").exists()]
        assert not left, f"processes {left} outlived `tuo run`"
    finally:
        if parent.poll() is None:
            parent.send_signal(signal.SIGTERM)
            await asyncio.to_thread(parent.wait, 30)


@asynccontextmanager
async def _router_in_this_process(
    services: Settings, pool: asyncpg.Pool
) -> AsyncIterator[tuple[Settings, SigningKey, service.Router]]:
    """A router running in this process on topics of its own: their settings, an office's
    key to sign events with, and the router; stopped at the end."""
    settings = await _isolated(services)
    await ensure_topics(settings, [*ENTITLED, *NOT_ENTITLED], principal=Principal.OPERATOR)
    key = await office_key(pool, services)
    router = service.Router(settings, pool)
    stop = asyncio.Event()
    running = asyncio.create_task(router.run(stop))
    try:
        yield settings, key, router
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)


async def test_records_handed_out_again_by_the_consumer_are_not_routed_twice(
    services: Settings, pool: asyncpg.Pool
) -> None:
    """aiokafka can hand out records it has handed out before: seen when an assignment is
    repeated at start-up (each time it seeks to the committed offset) while a batch is
    still being committed. The router routes from its own next offset, so such records
    are skipped, not sent again."""
    async with _router_in_this_process(services, pool) as (settings, key, router):
        first = await _stream(settings, count=20, per_second=50, key=key)
        await _assert_exactly_once(settings, first)
        assigned = router.consumer.assignment()
        assert assigned, "the router holds no partition"
        for tp in assigned:
            router.consumer.seek(tp, 0)  # every record of the partition, handed out again
        later = await _stream(settings, count=10, per_second=50, key=key)
        counts = await _assert_exactly_once(settings, first + later)
    assert counts == {agency: 30 for agency in ENTITLED}


async def test_router_transactions_are_never_made_to_wait_for_a_broker_retry(
    services: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Events one or two at a time, so each batch is its own transaction. Had the router
    let the input offsets join a transaction while the broker was still checking its
    writes with the transaction coordinator, the broker would have answered "not enough
    replicas" to some of them (KIP-890), and each would have waited 100 ms to be sent
    again, with a warning."""
    caplog.set_level(logging.WARNING, logger="aiokafka")
    async with _router_in_this_process(services, pool) as (settings, key, _):
        sent = await _stream(settings, count=150, per_second=40, key=key)
        counts = await _assert_exactly_once(settings, sent)
    assert counts == {agency: len(sent) for agency in ENTITLED}
    retried = [r.getMessage() for r in caplog.records if "NotEnoughReplicas" in r.getMessage()]
    assert not retried, f"{len(retried)} writes retried, e.g. {retried[0]}"
