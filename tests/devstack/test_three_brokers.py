"""The three-broker local cluster (`tuo stack up --brokers 3`) under a broker crash.

A world of its own: a three-broker stack (replication factor 3, min ISR 2, a three-voter
controller quorum) in a fresh state directory, and the whole bus on it. Deaths arrive
through the intake API at a steady pace; one broker is SIGKILLed mid-stream and started
again later. Intake must keep accepting, the relay and router must keep delivering on
the two remaining brokers, and in the end every accepted event is on the life-events
topic, and on each entitled agency's topic, exactly once (by ce_id, read_committed).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import ConsumerRecord

from devstack import LocalStack, StackError
from devstack.demo import seed_agency_records, seed_offices
from devstack.kafka import ControllerVoter, KafkaBroker, ensure_jars, new_cluster_id
from devstack.processes import free_port
from operators.services import RunningBus, start_bus
from producers.accounts import issue_token
from router.seed import load_seed
from runtime import kafka
from runtime.access import onboard_subscribed_agencies
from runtime.database import migrate, open_pool
from runtime.kafka import Topics
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.validation import today_in_the_uk
from tests.conftest import CACHE_DIR, KAFKA_VERSION, new_state_dir, processes_mentioning
from tests.support import (
    INSPECTOR,
    death_registration,
    eventually,
    grant_inspector,
    header,
    random_nino,
    read_topic,
    settings_from_stack,
)

pytestmark = pytest.mark.integration

# hmrc, dwp statutory; dvla by the informant's consent; council-leeds for a Leeds address
ENTITLED = ("hmrc", "dwp", "dvla", "council-leeds")
NOT_ENTITLED = ("hmpo", "council-bradford")  # consent refused / outside the area
PER_SECOND = 12.0
OUTAGE_SECONDS = 15.0


@dataclass
class Cluster:
    stack: LocalStack
    settings: Settings
    pool: asyncpg.Pool
    bus: RunningBus
    token: str

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)


@dataclass
class Submission:
    at: float  # wall clock, as Kafka's record timestamps
    status: int
    event_id: str | None


@dataclass
class Load:
    """Deaths submitted through intake, one after another at a steady pace."""

    submissions: list[Submission] = field(default_factory=list)

    def accepted(self, start: float = 0.0, end: float = float("inf")) -> list[str]:
        return [
            s.event_id for s in self.submissions if s.status == 201 and s.event_id and start <= s.at < end
        ]

    def refused(self) -> list[Submission]:
        return [s for s in self.submissions if s.status != 201]


def test_each_of_three_nodes_is_formatted_with_the_whole_quorum_and_replicates_thrice(
    tmp_path: Path,
) -> None:
    voters = tuple(ControllerVoter(n, free_port(), new_cluster_id()) for n in (1, 2, 3))
    node = KafkaBroker(
        libs=ensure_jars(CACHE_DIR, KAFKA_VERSION),
        home=tmp_path / "node-2",
        broker_port=free_port(),
        controller_port=voters[1].controller_port,
        cluster_id=new_cluster_id(),
        super_password="not-used",
        keystore_password="not-used",
        node_id=2,
        voters=voters,
        tls_dir=tmp_path / "tls",
    )
    node.prepare_storage()
    written = node.properties_file.read_text().splitlines()
    properties = dict(line.split("=", 1) for line in written if "=" in line)
    assert properties["node.id"] == "2"
    assert properties["controller.quorum.bootstrap.servers"] == ",".join(v.endpoint for v in voters)
    assert "controller.quorum.voters" not in properties, "a dynamic quorum, as 4.x formats it"
    for name in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert properties[name] == "3", name
    for name in (
        "min.insync.replicas",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.min.isr",
    ):
        assert properties[name] == "2", name
    meta = (node.data_dir / "meta.properties").read_text()
    assert "node.id=2" in meta and f"directory.id={voters[1].directory_id}" in meta
    with pytest.raises(StackError, match="1 or 3 Kafka brokers"):
        LocalStack(tmp_path / "state", CACHE_DIR, KAFKA_VERSION, brokers=2)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    state_dir = new_state_dir("three-brokers-")
    stack = LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION, brokers=3)
    try:
        started = time.monotonic()
        await asyncio.to_thread(stack.up)
        print(f"\nthree-broker stack up in {time.monotonic() - started:.1f}s")
        http_port = free_port()
        settings = settings_from_stack(
            stack.env_file,
            state_dir=state_dir,
            cache_dir=CACHE_DIR,
            http_port=http_port,
            public_url=f"http://127.0.0.1:{http_port}",
        )
        await grant_inspector(settings)
        pool = await open_pool(settings)
        try:
            await migrate(pool, settings)
            await load_seed(pool)
            await seed_offices(pool, PayloadSealer.from_settings(settings))
            await seed_agency_records(pool, today_in_the_uk())
            await onboard_subscribed_agencies(settings, pool, by="tests")
            token = await issue_token(pool, "leeds", "registrar", "three-broker test")
            bus = await start_bus(settings, pool)
            try:
                yield Cluster(stack, settings, pool, bus, token)
            finally:
                await bus.shutdown()
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(stack.purge)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not processes_mentioning(str(state_dir)), "the three-broker stack still runs"


async def submit_deaths(cluster: Cluster, load: Load, until: asyncio.Event) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{cluster.bus.http_port}",
        timeout=10,
        headers={"Authorization": f"Bearer {cluster.token}"},
    ) as client:
        while not until.is_set():
            body = death_registration(deceased={**death_registration()["deceased"], "nino": random_nino()})
            response = await client.post("/v1/death-registrations", json=body)
            event_id = response.json().get("event_id") if response.status_code == 201 else None
            load.submissions.append(Submission(time.time(), response.status_code, event_id))
            await asyncio.sleep(1 / PER_SECOND)


async def receipted_by_every_entitled_agency(cluster: Cluster, event_ids: list[str]) -> bool:
    """Every entitled agency's consumer has read each event from its topic and answered
    (a cheap proxy, polled; the topics themselves are read once everything is in)."""
    receipted = await cluster.pool.fetchval(
        "SELECT count(DISTINCT (event_id, agency)) FROM delivery_receipt"
        " WHERE event_id = ANY($1::uuid[]) AND agency = ANY($2::text[])",
        event_ids,
        list(ENTITLED),
    )
    return bool(receipted == len(event_ids) * len(ENTITLED))


async def leader_of(cluster: Cluster, topic: str, partition: int) -> int:
    admin = kafka.admin(cluster.settings, principal=INSPECTOR)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return next(int(p["leader"]) for p in described["partitions"] if p["partition"] == partition)
    finally:
        await admin.close()


async def replication(cluster: Cluster, topics: list[str]) -> dict[str, tuple[set[int], set[int], str]]:
    """Per topic: the replication factors and in-sync replica counts of its partitions,
    and its effective min.insync.replicas."""
    admin = kafka.admin(cluster.settings, principal=INSPECTOR)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
        configs = await _min_isr(admin, topics)
    finally:
        await admin.close()
    return {
        t["topic"]: (
            {len(p["replicas"]) for p in t["partitions"]},
            {len(p["isr"]) for p in t["partitions"]},
            configs[t["topic"]],
        )
        for t in described
    }


async def _min_isr(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, str]:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None}) for topic in topics]
    )
    found = {}
    for response in responses:
        for _code, _message, _type, name, entries in response.resources:
            for entry in entries:
                if entry[0] == "min.insync.replicas":
                    found[name] = str(entry[1])
    return found


def longest_pause(records: list[ConsumerRecord[bytes, bytes]], start: float, end: float) -> float:
    """The longest time between two records written from ``start`` to ``end`` (seconds)."""
    times = [start * 1000, end * 1000]
    times += [float(r.timestamp) for r in records if start * 1000 <= r.timestamp < end * 1000]
    return max(b - a for a, b in itertools.pairwise(sorted(times))) / 1000


def timestamped_between(records: list[ConsumerRecord[bytes, bytes]], start: float, end: float) -> int:
    """How many records were written between two wall-clock times (their CreateTime)."""
    return sum(1 for r in records if start * 1000 <= r.timestamp < end * 1000)


async def test_a_broker_killed_under_load_loses_and_duplicates_nothing_and_the_bus_keeps_going(
    cluster: Cluster,
) -> None:
    began = time.monotonic()
    topics = cluster.topics
    bus_topics = [topics.life_events, topics.routing_decisions, *(topics.agency(a) for a in ENTITLED)]
    replicated = await replication(cluster, bus_topics)
    assert {name: (rf, minimum) for name, (rf, _, minimum) in replicated.items()} == {
        name: ({3}, "2") for name in bus_topics
    }, "every bus topic: 3 replicas, min ISR 2"

    load = Load()
    stop_load = asyncio.Event()
    submitting = asyncio.create_task(submit_deaths(cluster, load, stop_load))
    try:
        # Flowing end to end before the crash (consumer groups, transaction coordinators).
        await eventually(lambda: _after(load, 30), timeout=60, what="30 deaths submitted")
        await eventually(
            lambda: receipted_by_every_entitled_agency(cluster, load.accepted()[:30]),
            timeout=90,
            what="the first deaths at every entitled agency",
        )
        victim = await leader_of(cluster, topics.life_events, 0)
        killed_at = time.time()
        await asyncio.to_thread(cluster.stack.kill_broker, victim)
        assert cluster.stack.status().broker_pids[victim] is None
        await asyncio.sleep(OUTAGE_SECONDS)
        restarting_at = time.time()
        await asyncio.to_thread(cluster.stack.start_broker, victim, 180)
        back_at = time.time()
        await asyncio.sleep(3)  # and some more with all three
    finally:
        stop_load.set()
        await submitting
    accepted = load.accepted()
    assert not load.refused(), f"intake refused {len(load.refused())}: {load.refused()[:3]}"
    during_outage = load.accepted(killed_at, back_at)
    assert len(during_outage) > OUTAGE_SECONDS * PER_SECOND / 3, "intake kept accepting with a broker down"

    await eventually(
        lambda: receipted_by_every_entitled_agency(cluster, accepted),
        timeout=120,
        what=f"all {len(accepted)} deaths at every entitled agency",
    )
    life_events = await read_topic(cluster.settings, topics.life_events)
    on_life_events = Counter(header(r, "ce_id") for r in life_events)
    duplicates = {event_id: n for event_id, n in on_life_events.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events are on {topics.life_events} more than once"
    assert set(on_life_events) == set(accepted), "life-events holds exactly the accepted events"
    delivered_in_outage = {}
    for agency in ENTITLED:
        records = await read_topic(cluster.settings, topics.agency(agency))
        counted = Counter(header(r, "ce_id") for r in records)
        assert not {e: n for e, n in counted.items() if n > 1}, f"{agency} got events more than once"
        assert set(counted) == set(accepted), f"{agency} got exactly the accepted events"
        delivered_in_outage[agency] = timestamped_between(records, killed_at, restarting_at)
    for agency in NOT_ENTITLED:
        seen = {header(r, "ce_id") for r in await read_topic(cluster.settings, topics.agency(agency))}
        assert not seen & set(accepted), f"{agency} is not entitled to these deaths"
    published_in_outage = timestamped_between(life_events, killed_at, restarting_at)
    pause = longest_pause(life_events, killed_at, restarting_at)
    assert published_in_outage > 0, "the relay kept publishing on two brokers"
    assert min(delivered_in_outage.values()) > 0, "the router kept delivering on two brokers"

    async def back_in_sync() -> bool:
        now = await replication(cluster, bus_topics)
        return all(isr == {3} for _, isr, _ in now.values())

    await eventually(back_in_sync, timeout=60, what=f"broker {victim} back in every ISR")
    print(
        f"\nbroker {victim} (leader of {topics.life_events}-0) SIGKILLed for {restarting_at - killed_at:.0f}s"
        f" (+{back_at - restarting_at:.0f}s to start again): {len(accepted)} deaths accepted"
        f" ({len(during_outage)} while it was down, none refused); {published_in_outage} reached"
        f" {topics.life_events} (after a pause of {pause:.1f}s at most) and"
        f" {min(delivered_in_outage.values())}-{max(delivered_in_outage.values())} reached each"
        " entitled agency while it was down;"
        f" in the end each exactly once on {topics.life_events} and at {', '.join(ENTITLED)};"
        f" all three replicas back in sync. {time.monotonic() - began:.0f}s"
    )


async def _after(load: Load, count: int) -> bool:
    return len(load.accepted()) >= count
