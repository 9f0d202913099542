"""The outbox relay under faults, in a world of its own: its own Kafka broker (so it
can be restarted), its own database on the suite's PostgreSQL server, its own
topics, and the relay as a separate `tuo run relay` process that is SIGKILLed. The
topic must hold every recorded event exactly once (counted by ce_id, read_committed),
in outbox order."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from pydantic import SecretStr
from structlog.testing import capture_logs

from devstack.kafka import KafkaBroker, ensure_jars, ensure_tool_jars, new_cluster_id
from devstack.processes import free_port
from producers.office_keys import SigningKey
from producers.relay import LedgerLost, OutboxRelay, claim_batch
from producers.store import NewEvent, record_event
from runtime import kafka
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.kafka import Topics, ensure_topics
from runtime.kafka_admin import new_password
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.conftest import CACHE_DIR, KAFKA_VERSION, PROJECT, processes_mentioning
from tests.support import (
    death_message,
    eventually,
    header,
    kafka_env,
    kafka_log_evidence,
    office_key,
    read_topic,
)

pytestmark = pytest.mark.integration

TUO = str(Path(sys.executable).parent / "tuo")


@dataclass
class World:
    settings: Settings
    pool: asyncpg.Pool  # this world's own database
    database: str
    key: SigningKey  # a registration office's, to sign the events as intake would
    home: Path  # relay logs, and a state dir with no stack.env in it
    broker: KafkaBroker

    @property
    def topic(self) -> str:
        return Topics(self.settings.topic_prefix).life_events

    @property
    def relay_log(self) -> Path:
        return self.home / "relay.log"


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaBroker]:
    """A broker of this module's own, so that a test may restart it."""
    broker = KafkaBroker(
        libs=await asyncio.to_thread(ensure_jars, CACHE_DIR, KAFKA_VERSION),
        home=tmp_path_factory.mktemp("relay-kafka"),
        broker_port=free_port(),
        controller_port=free_port(),
        cluster_id=new_cluster_id(),
        super_password=new_password(),
        keystore_password=new_password(),
        heap="512m",
    )
    try:
        await asyncio.to_thread(broker.start)
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)
        assert not processes_mentioning(str(broker.properties_file)), "the test's broker still runs"


@pytest.fixture
async def world(
    services: Settings, pool: asyncpg.Pool, broker: KafkaBroker, tmp_path: Path
) -> AsyncIterator[World]:
    database = f"relay_{uuid.uuid4().hex[:12]}"
    await pool.execute(f'CREATE DATABASE "{database}"')
    url = urlsplit(services.require_database_url())._replace(path=f"/{database}").geturl()
    settings = services.model_copy(
        update={
            "kafka_bootstrap_servers": broker.bootstrap_servers,
            # This broker has none of the bus's principals: every client is its super user.
            # The relay's crash safety is under test here, not its ACLs.
            "kafka_ssl_cafile": broker.tls.ca_file,
            "kafka_credentials_file": None,
            "kafka_sasl_username": "broker",
            "kafka_sasl_password": SecretStr(broker.super_password),
            "database_url": SecretStr(url),
            "topic_prefix": f"relay{uuid.uuid4().hex[:8]}",
            "state_dir": tmp_path / "no-stack",
        }
    )
    try:
        own = await open_pool(settings)
        try:
            await migrate(own, settings)
            await ensure_topics(settings, [], principal=Principal.OPERATOR)
            yield World(settings, own, database, await office_key(own, settings), tmp_path, broker)
        finally:
            await own.close()
    finally:
        await pool.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def start_relay(world: World) -> asyncio.subprocess.Process:
    settings = world.settings
    assert settings.pseudonym_key is not None
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("TUO_")},
        **kafka_env(settings),
        "TUO_DATABASE_URL": settings.require_database_url(),
        "TUO_PSEUDONYM_KEY": settings.pseudonym_key.get_secret_value(),
        "TUO_DATA_KEY": settings.data_key.get_secret_value() if settings.data_key else "",
        "TUO_TOPIC_PREFIX": settings.topic_prefix,
        "TUO_STATE_DIR": str(settings.state_dir),
        "TUO_LOG_LEVEL": "INFO",
        "TUO_LOG_FORMAT": "json",
    }
    with world.relay_log.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            TUO, "run", "relay", cwd=PROJECT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )


async def kill(relay: asyncio.subprocess.Process) -> None:
    relay.send_signal(signal.SIGKILL)
    await relay.wait()


async def stop(relay: asyncio.subprocess.Process) -> int:
    if relay.returncode is None:
        relay.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(relay.wait(), timeout=30)
        except TimeoutError:
            await kill(relay)
    assert relay.returncode is not None
    return relay.returncode


def relay_log_events(world: World, event: str) -> list[dict[str, object]]:
    found = []
    for line in world.relay_log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def relay_timeline(world: World, batches: set[int]) -> str:
    """The relays' starts, failures and settlements, the batches near ``batches``, and
    each distinct aiokafka complaint once (with a count): what a failed run leaves to
    explain itself, since CI keeps no temporary files."""
    near = {b + d for b in batches for d in range(-2, 3)}
    lines: list[str] = []
    complaints: Counter[str] = Counter()
    for line in world.relay_log.read_text().splitlines():
        if not line.startswith("{"):
            if line.startswith(("WARNING:", "ERROR:")):
                complaints[line[:200]] += 1
                if complaints[line[:200]] == 1:
                    lines.append(line[:200])
            continue
        entry = json.loads(line)
        if entry.get("event") != "outbox_published" or entry.get("batch") in near:
            lines.append(line[:300])
    repeated = [f"({n} times) {text}" for text, n in complaints.items() if n > 1]
    return "\n".join(lines + repeated)


async def broker_evidence(world: World, locations: list[tuple[int, int]]) -> str:
    """Kafka's own account of the records at these (partition, offset)s of the test's topic."""
    return await kafka_log_evidence(
        await asyncio.to_thread(ensure_tool_jars, CACHE_DIR, KAFKA_VERSION),
        world.broker.data_dir,
        world.broker.log_dir / "server.log",
        [(world.topic, partition, offset) for partition, offset in locations],
        mention=(world.settings.topic_prefix,),
    )


def new_event(world: World, n: int) -> NewEvent:
    subject_id = f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject_id, key=world.key)
    return NewEvent(
        reference=f"TUO-RELAY-{n:06d}-{uuid.uuid4().hex[:6]}",
        event_id=uuid.UUID(event_id),
        event_type="DeathRegistered",
        subject_id=subject_id,
        registration_office=world.key.office,
        recorded_by="relay-test",
        recorded_at=datetime.now(UTC),
        idempotency_key=None,
        request_fingerprint="relay-test",
        consents=[],
        topic=world.topic,
        message_key=subject_id.encode(),
        message_value=PayloadSealer.from_settings(world.settings).seal(value, uuid.UUID(event_id)),
        headers=headers,
    )


async def record_stream(
    world: World, per_second: float, recorded: list[str], until: asyncio.Event, limit: int = 3000
) -> None:
    """Record events at a steady pace, as intake would, until told to stop;
    ``recorded`` fills as they commit."""
    while not until.is_set() and len(recorded) < limit:
        event = new_event(world, len(recorded))
        await record_event(world.pool, event)
        recorded.append(str(event.event_id))
        await asyncio.sleep(1 / per_second)


async def published_count(world: World) -> int:
    count: int = await world.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
    return count


async def publishing(world: World, relay: asyncio.subprocess.Process) -> None:
    """Wait until ``relay`` publishes rows (it has started and is mid-flow)."""
    before = await published_count(world)

    async def progressed() -> bool:
        assert relay.returncode is None, f"relay exited by itself; see {world.relay_log}"
        return await published_count(world) > before

    await eventually(progressed, timeout=60, what="the relay to publish")


async def all_published(world: World) -> bool:
    return bool(await world.pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"))


async def settle_relay_transactions(world: World, settings: Settings) -> None:
    """Fence the relay's transactional id, which returns once its last transaction is
    complete: a commit returns before the broker has written the commit markers, so a
    read_committed reader sees a just-committed batch only a moment later."""
    transactional_id = OutboxRelay(settings, world.pool).transactional_id
    producer = kafka.producer(
        settings, principal=Principal.RELAY, client_id="relay-test", transactional_id=transactional_id
    )
    await producer.start()
    await producer.stop()


async def assert_each_exactly_once_in_outbox_order(
    world: World, recorded: list[str], relay_settings: Settings | None = None
) -> int:
    """Read the whole topic, once the (stopped) relay's transactions are settled."""
    await settle_relay_transactions(world, relay_settings or world.settings)
    records = await read_topic(world.settings, world.topic)
    counted = Counter(header(r, "ce_id") for r in records)
    duplicates = {event_id: n for event_id, n in counted.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events are on the topic more than once"
    missing = set(recorded) - set(counted)
    if missing:
        rows = await world.pool.fetch(
            "SELECT id, event_id, relay_batch, published_at FROM outbox"
            " WHERE event_id = ANY($1::uuid[]) ORDER BY id",
            list(missing),
        )
        raw = await _read_uncommitted(world)
        raise AssertionError(
            f"{len(missing)} recorded events never reached the topic: "
            + "; ".join(
                f"row {r['id']} batch {r['relay_batch']} at {r['published_at']}"
                f" uncommitted at {raw.get(str(r['event_id']))}"
                for r in rows
            )
            + "\nthe relays' log around those batches:\n"
            + relay_timeline(world, {r["relay_batch"] for r in rows})
            + "\nthe broker's log segments around them:\n"
            + await broker_evidence(world, [where for r in rows for where in raw.get(str(r["event_id"]), [])])
        )
    extra = set(counted) - set(recorded)
    assert not extra, f"{len(extra)} events on the topic were never recorded"
    outbox_id = {
        str(r["event_id"]): r["id"] for r in await world.pool.fetch("SELECT id, event_id FROM outbox")
    }
    for partition in {r.partition for r in records}:
        ids = [outbox_id[header(r, "ce_id") or ""] for r in records if r.partition == partition]
        assert ids == sorted(ids), f"partition {partition} is not in outbox order"
    return len(records)


async def _read_uncommitted(world: World) -> dict[str, list[tuple[int, int]]]:
    """Where each event id is in the log, committed or not (to explain a failure)."""
    consumer = AIOKafkaConsumer(
        world.topic,
        **kafka.connection_options(world.settings, "broker"),
        isolation_level="read_uncommitted",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: dict[str, list[tuple[int, int]]] = {}
    try:

        async def assigned() -> list[TopicPartition]:
            return sorted(consumer.assignment())

        partitions = await eventually(assigned, timeout=10, what=f"partitions of {world.topic}")
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for part in (await consumer.getmany(timeout_ms=1000)).values():
                for r in part:
                    found.setdefault(header(r, "ce_id") or "", []).append((r.partition, r.offset))
    finally:
        await consumer.stop()
    return found


async def test_relay_transactions_are_never_made_to_wait_for_a_broker_retry(world: World) -> None:
    # Each event is its own Kafka transaction. Had the relay let its ledger offset join a
    # transaction while the broker was still checking its writes with the transaction
    # coordinator, the broker would have answered "not enough replicas" to some of them
    # (KIP-890), and each would have waited 100 ms to be sent again, with a warning.
    relay = await start_relay(world)
    recorded: list[str] = []
    try:
        for n in range(150):
            event = new_event(world, n)
            await record_event(world.pool, event)
            recorded.append(str(event.event_id))
            await eventually(lambda: all_published(world), timeout=30, what="the event published")
        exit_code = await stop(relay)
    finally:
        await stop(relay)
    assert exit_code == 0, f"the relay did not stop cleanly; see {world.relay_log}"
    assert await assert_each_exactly_once_in_outbox_order(world, recorded) == len(recorded)
    batches = relay_log_events(world, "outbox_published")
    assert len(batches) >= len(recorded) - 5, "the events should have gone one transaction each"
    retried = [line for line in world.relay_log.read_text().splitlines() if "NotEnoughReplicas" in line]
    assert not retried, f"{len(retried)} writes retried, e.g. {retried[0]}"


async def test_relay_killed_at_random_and_broker_restarted_publishes_each_event_exactly_once(
    world: World, broker: KafkaBroker
) -> None:
    kills_wanted = 5
    started = time.monotonic()
    recorded: list[str] = []
    enough = asyncio.Event()
    relay = await start_relay(world)
    streaming = asyncio.create_task(record_stream(world, 60.0, recorded, until=enough))
    kills = broker_restarts = 0
    try:
        while kills < kills_wanted:
            # Strike only once this relay is publishing, at a random moment in its flow.
            await publishing(world, relay)
            await asyncio.sleep(random.uniform(0, 0.5))
            if kills == 1 and broker_restarts == 0:
                await asyncio.to_thread(broker.stop)
                await asyncio.to_thread(broker.start)
                broker_restarts += 1
            else:
                await kill(relay)
                kills += 1
                relay = await start_relay(world)
        await publishing(world, relay)
        enough.set()
        await streaming
        await eventually(lambda: all_published(world), timeout=60, what="every outbox row published")
        exit_code = await stop(relay)
    finally:
        enough.set()
        await stop(relay)
    assert exit_code == 0, f"the relay did not stop cleanly; see {world.relay_log}"
    on_topic = await assert_each_exactly_once_in_outbox_order(world, recorded)
    assert on_topic == len(recorded) > 300
    settled = relay_log_events(world, "relay_claims_settled")
    marked = sum(int(str(entry["marked"])) for entry in settled)
    released = sum(int(str(entry["released"])) for entry in settled)
    print(
        f"\n{len(recorded)} events, relay SIGKILLed {kills} times, broker restarted {broker_restarts}"
        f" time(s): each event on {world.topic} exactly once, in outbox order. Claims left by the"
        f" crashes: {marked} rows confirmed from the ledger, {released} released and sent again."
        f" {time.monotonic() - started:.1f}s"
    )


# Holds the first row a statement marks published (less than the pool's 30 s command timeout).
HOLD_MARKING = """
CREATE FUNCTION hold_marking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(25);
    RETURN NEW;
END $$;
CREATE TRIGGER hold_marking BEFORE UPDATE OF published_at ON outbox
    FOR EACH ROW WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION hold_marking();
"""


async def test_relay_killed_between_kafka_commit_and_marking_rows_sends_nothing_twice(
    world: World,
) -> None:
    # Marking rows published blocks (a trigger sleeps), so the relay is caught with its
    # Kafka transaction committed and its rows still unmarked; then it is SIGKILLed.
    await world.pool.execute(HOLD_MARKING)
    events = [new_event(world, n) for n in range(60)]
    for event in events:
        await record_event(world.pool, event)
    recorded = [str(e.event_id) for e in events]
    relay = await start_relay(world)
    try:

        async def committed_but_unmarked() -> bool:
            assert relay.returncode is None, f"relay exited by itself; see {world.relay_log}"
            on_topic = await read_topic(world.settings, world.topic)
            return len(on_topic) == len(events)

        await eventually(committed_but_unmarked, timeout=60, what="the batch on the topic")
        await kill(relay)
        held = await world.pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND wait_event = 'PgSleep'",
            world.database,
        )
        assert held == 1, "the killed relay's marking statement was not held"
        await world.pool.execute("DROP TRIGGER hold_marking ON outbox")
        claimed = await world.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE relay_batch IS NOT NULL AND published_at IS NULL"
        )
        assert claimed == len(events), "every row should be claimed and none marked"

        relay = await start_relay(world)
        await eventually(lambda: all_published(world), timeout=60, what="every outbox row published")
        exit_code = await stop(relay)
    finally:
        await stop(relay)
    assert exit_code == 0, f"the relay did not stop cleanly; see {world.relay_log}"
    assert await assert_each_exactly_once_in_outbox_order(world, recorded) == len(events)
    settled = relay_log_events(world, "relay_claims_settled")
    assert [(entry["marked"], entry["released"]) for entry in settled] == [(len(events), 0)]


async def run_relay_until_idle(world: World, settings: Settings) -> None:
    """Run a relay in this process until the outbox is empty, then stop it."""
    stop_relay = asyncio.Event()
    running = asyncio.create_task(OutboxRelay(settings, world.pool).run(stop_relay))
    try:

        async def drained() -> bool:
            if running.done():
                running.result()
            return await all_published(world)

        await eventually(drained, timeout=60, what="every outbox row published")
    finally:
        stop_relay.set()
        await running


async def test_relay_without_its_ledger_refuses_to_guess_about_claimed_rows(world: World) -> None:
    for n in range(5):
        await record_event(world.pool, new_event(world, n))
    await run_relay_until_idle(world, world.settings)
    # A relay claims the next rows and dies; then its ledger is gone (here: a relay
    # configured with another prefix, whose ledger group was never written).
    for n in range(5, 8):
        await record_event(world.pool, new_event(world, n))
    async with world.pool.acquire() as conn:
        claimed = await claim_batch(conn, 500)
    assert claimed is not None
    batch, _ = claimed
    elsewhere = world.settings.model_copy(update={"topic_prefix": world.settings.topic_prefix + "x"})
    await ensure_topics(elsewhere, [], principal=Principal.OPERATOR)

    with pytest.raises(LedgerLost) as refused:
        await OutboxRelay(elsewhere, world.pool).run(asyncio.Event())
    assert refused.value.batches == [batch]
    assert not await all_published(world), "nothing may be marked sent on a guess"

    # Someone settles the claim by hand (here: its rows were not on the topic); the relay
    # then writes its ledger back before it claims anything, and carries on.
    await world.pool.execute("UPDATE outbox SET relay_batch = NULL WHERE published_at IS NULL")
    with capture_logs() as logs:
        await run_relay_until_idle(world, elsewhere)
    assert [e["ledger"] for e in logs if e["event"] == "relay_ledger_restored"] == [batch - 1]
    assert await OutboxRelay(elsewhere, world.pool).read_ledger() == batch + 1
    recorded = [str(r["event_id"]) for r in await world.pool.fetch("SELECT event_id FROM outbox")]
    assert await assert_each_exactly_once_in_outbox_order(world, recorded, elsewhere) == 8
