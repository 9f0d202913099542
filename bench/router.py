"""Router throughput against a bare aiokafka pipe moving the same bytes, and against
Kafka's own producer on the same broker, in one run.

    .venv/bin/python -m bench.router [--events 20000] [--batch-mib 1]

Starts its own local stack (Kafka + PostgreSQL, in a scratch state directory;
every Kafka client over TLS with SASL/SCRAM, as the bus's), loads the demo
subscriptions, gives every subject consent for the consent-based agencies, and
puts N signed DeathRegistered events on a fresh life-events topic. Then, on the
same broker and the same input:

  (a) the router: one transactional producer per input partition, consent and
      subscriptions read from PostgreSQL per batch, signatures verified, decide,
      minimise, re-encode per agency; agency copies, routing decisions and the
      consumer offsets in one Kafka transaction per batch.
  (b) bare pipe: the same consume → produce shape without the work. It reads the
      same input (read_committed, up to as many records per poll as the router, one transactional
      producer per input partition) and writes, per event, a copy of the router's own
      output for that agency (same value bytes, same headers, this event's ce_id) to
      each agency that received one, and one routing decision per agency, with the
      offsets, in one transaction per batch. It uses aiokafka's fastest path: whole
      record batches built with ``create_batch``/``send_batch`` (``--batch-mib``).
  (c) this broker on this machine: Kafka's ``ProducerPerformance`` (acks=all,
      SASL_SSL, 1 MiB batches) writing records of the router's mean record size
      (key, value and headers), as many as the router wrote but at least
      ``PERF_MIN_RECORDS``; its records/s divided by the router's messages per
      event gives events/s.

Before any rate is printed, every output is read back with read_committed and
counted by ce_id: each event must reach each entitled agency exactly once and have
exactly one routing decision per agency, or the run fails with the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.structs import ConsumerRecord, TopicPartition

from bench import producer_performance
from bench.arrivals import NotAllArrived, TooSlow, TopicTally, ce_id, read_committed
from bench.scratch import bench_client_options, deploy_bus, scratch_stack
from router.seed import load_seed
from router.service import MAX_BATCH, Router
from router.store import agencies, load_subscriptions
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.garbage import fewer_collections
from runtime.kafka import Topics, admin, ensure_topics, offsets_after_writes, partition_of
from runtime.logging import configure_logging
from runtime.settings import Settings
from tests.golden.make_vectors import EXAMPLES
from tests.support import death_message, office_key

EVENT_TYPE = "DeathRegistered"
POLL_RECORDS = MAX_BATCH  # as the router polls
MIB = 1024 * 1024
# Kafka's tool needs some seconds to warm up (JVM, batches filling): never fewer records.
PERF_MIN_RECORDS = 150_000

Headers = list[tuple[str, bytes]]


async def _receivers(pool: asyncpg.Pool) -> tuple[list[str], list[str]]:
    """(agencies entitled to each benchmark event, consent-based agencies among them).

    Worked out here from the subscriptions and the event's local authority, not asked
    of the router: the benchmark's expectation must not come from the code it measures.
    Every subject consents to every consent-based agency, so those are entitled too."""
    area = EXAMPLES[EVENT_TYPE]["last_address"]["local_authority"]
    entitled = [
        s
        for s in await load_subscriptions(pool)
        if s.event_type == EVENT_TYPE
        and s.status == "active"
        and (not s.condition.local_authorities or area in s.condition.local_authorities)
    ]
    return sorted({s.agency for s in entitled}), sorted(
        {s.agency for s in entitled if s.legal_basis == "consent"}
    )


async def _fill(settings: Settings, events: int, pool: asyncpg.Pool, consent_to: list[str]) -> list[str]:
    """Put ``events`` signed events on life-events; their event ids (ce_id)."""
    topic = Topics(settings.topic_prefix).life_events
    producer = AIOKafkaProducer(**bench_client_options(settings), linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    consents = []
    sent = []
    key = await office_key(pool, settings)
    try:
        pending = []
        for _ in range(events):
            subject_id = f"s-{uuid.uuid4().hex}"
            event_id, value, headers = death_message(subject_id, nino="AB123456C", key=key)
            pending.append(await producer.send(topic, value, key=subject_id.encode(), headers=headers))
            sent.append(event_id)
            consents += [(subject_id, agency) for agency in consent_to]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    await pool.executemany(
        "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
        " VALUES ($1, $2, 'DeathRegistered', 'given', 'informant')",
        consents,
    )
    return sent


@dataclass(frozen=True)
class Pace:
    per_s: float  # input events / wall seconds, start-up (group join, fencing) included
    wall_s: float
    # From the first committed transaction to the last, start-up excluded; None when
    # the first transaction already held half the events (too few to tell).
    steady_per_s: float | None


async def _committed_rate(
    settings: Settings,
    group: str,
    partitions: list[TopicPartition],
    events: int,
    work: Awaitable[None],
    seconds: float,
) -> Pace:
    """Run ``work`` until ``group`` has committed offsets past all ``events`` input
    records, or fail after ``seconds``; how long it took."""
    watcher = AIOKafkaConsumer(**bench_client_options(settings), group_id=group, enable_auto_commit=False)
    await watcher.start()
    task = asyncio.ensure_future(work)
    started = time.perf_counter()
    first: tuple[float, int] | None = None
    try:
        while True:
            done = sum([await watcher.committed(tp) or 0 for tp in partitions])
            now = time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done >= events:
                break
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"{group} stopped after committing {done:,} of {events:,} events")
            if now - started > seconds:
                raise TooSlow(group, seconds, f"{done:,} of {events:,} input events committed")
            await asyncio.sleep(0.02)
        assert first is not None
        steady = None
        if first[1] <= events // 2 and now > first[0]:
            steady = (events - first[1]) / (now - first[0])
        return Pace(events / (now - started), now - started, steady)
    finally:
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await watcher.stop()


async def _router(settings: Settings, pool: asyncpg.Pool, events: int, seconds: float) -> Pace:
    router = Router(settings, pool)
    stop = asyncio.Event()
    topic = Topics(settings.topic_prefix).life_events
    partitions = [TopicPartition(topic, p) for p in range(settings.life_events_partitions)]

    async def work() -> None:
        try:
            await router.run(stop)
        finally:
            stop.set()

    running = asyncio.ensure_future(work())
    try:
        return await _committed_rate(
            settings, router.group_id, partitions, events, _forever(running), seconds
        )
    finally:
        stop.set()
        await running


async def _router_processes(
    settings: Settings, env: dict[str, str], processes: int, events: int, seconds: float
) -> Pace:
    """The router as a deployment runs it: `tuo run router` with ``TUO_ROUTER_PROCESSES``,
    that many router processes in one consumer group (this one and its children);
    timed like the one in this process, start-up included."""
    topic = Topics(settings.topic_prefix).life_events
    partitions = [TopicPartition(topic, p) for p in range(settings.life_events_partitions)]
    running = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "tuo"),
        "run",
        "router",
        env={**env, "TUO_ROUTER_PROCESSES": str(processes)},
        stdout=asyncio.subprocess.DEVNULL,
    )

    async def exited() -> None:
        raise RuntimeError(f"`tuo run router` exited early with {await running.wait()}")

    try:
        return await _committed_rate(
            settings, f"{settings.topic_prefix}.router", partitions, events, exited(), seconds
        )
    finally:
        if running.returncode is None:
            running.send_signal(signal.SIGINT)
        await running.wait()


async def _forever(task: asyncio.Future[None]) -> None:
    """Wait on ``task`` without cancelling it when the waiter is cancelled: the router
    stops through its ``stop`` event, not by cancellation."""
    await asyncio.shield(task)


class Templates:
    """The router's own output for one event, as the bare pipe copies it for each event:
    per entitled agency the copy it received, per agency its routing decision."""

    def __init__(
        self,
        copies: dict[str, ConsumerRecord[bytes, bytes]],
        decisions: dict[str, ConsumerRecord[bytes, bytes]],
    ):
        self.copies = {agency: (r.value or b"", r.headers) for agency, r in copies.items()}
        self.decisions = {agency: (r.value or b"", r.headers) for agency, r in decisions.items()}


def _as_for(headers: Headers, identity: str, subject: bytes | None) -> Headers:
    """``headers`` with this event's ce_id and ce_subject: same names, same sizes."""
    return [
        (name, identity.encode() if name == "ce_id" else (subject or b"") if name == "ce_subject" else value)
        for name, value in headers
    ]


async def _bare_pipe(
    settings: Settings, events: int, templates: Templates, batch_size: int, seconds: float
) -> Pace:
    topics = Topics(settings.topic_prefix)
    group = f"{settings.topic_prefix}.bare"
    partitions = [TopicPartition(topics.life_events, p) for p in range(settings.life_events_partitions)]
    decisions_topic = f"{settings.topic_prefix}.bare.routing-decisions"
    options = bench_client_options(settings)
    consumer = AIOKafkaConsumer(
        **options,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producers = {
        tp: AIOKafkaProducer(
            **options,
            transactional_id=f"{group}.{tp.partition}",
            enable_idempotence=True,
            acks="all",
            linger_ms=0,  # whole batches are handed over; nothing to wait for
            max_batch_size=batch_size,
            max_request_size=max(batch_size + 64 * 1024, MIB),
        )
        for tp in partitions
    }

    async def pipe(tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        producer = producers[tp]
        out: dict[tuple[str, int], list[tuple[bytes | None, bytes, Headers]]] = {}
        for record in records:
            identity = ce_id(record) or ""
            for agency, (value, headers) in templates.copies.items():
                out.setdefault((f"{settings.topic_prefix}.bare.agency.{agency}", 0), []).append(
                    (record.key, value, _as_for(headers, identity, record.key))
                )
            partition = partition_of(record.key or b"", settings.life_events_partitions)
            for agency, (value, headers) in templates.decisions.items():
                out.setdefault((decisions_topic, partition), []).append(
                    (record.key, value, _as_for(headers, f"{identity}/{agency}", record.key))
                )
        async with producer.transaction():
            sent = []
            for (topic, partition), messages in out.items():
                batch = producer.create_batch()
                for key, value, headers in messages:
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        sent.append(await producer.send_batch(batch, topic, partition=partition))
                        batch = producer.create_batch()
                        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                            raise RuntimeError(f"one message does not fit a {batch_size:,}-byte batch")
                sent.append(await producer.send_batch(batch, topic, partition=partition))
            await offsets_after_writes(producer, sent, {tp: records[-1].offset + 1}, group)

    async def work() -> None:
        await consumer.start()
        try:
            for producer in producers.values():
                await producer.start()
            consumer.assign(partitions)
            for tp in partitions:
                committed = await consumer.committed(tp)
                if committed is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, committed)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=POLL_RECORDS)
                await asyncio.gather(*(pipe(tp, records) for tp, records in batches.items()))
        finally:
            for producer in producers.values():
                await producer.stop()
            await consumer.stop()

    return await _committed_rate(settings, group, partitions, events, work(), seconds)


def check_routed(
    what: str,
    tallies: dict[str, TopicTally],
    sent: list[str],
    copies_to: dict[str, str],
    withheld_from: dict[str, str],
    decisions_topic: str,
    decided_for: list[str],
) -> int:
    """How many sent events arrived exactly as they should: one copy on each entitled
    agency's topic (``copies_to``: agency → topic), none on another's (``withheld_from``),
    one routing decision per agency. Raises ``NotAllArrived`` with every topic's count
    unless that is all of them and nothing else is there."""
    expected = set(sent)
    complete = set(expected)
    counts = []
    for agency, topic in copies_to.items():
        ids = tallies[topic].ids
        complete &= {i for i in expected if ids[i] == 1}
        counts.append(f"{agency} {sum(ids[i] == 1 for i in expected):,} of {len(expected):,}")
    for agency, topic in withheld_from.items():
        ids = tallies[topic].ids
        complete -= set(ids)
        counts.append(f"{agency} (not entitled) {tallies[topic].messages:,}")
    decided = tallies[decisions_topic].ids
    complete &= {i for i in expected if all(decided[f"{i}/{a}"] == 1 for a in decided_for)}
    counts.append(
        f"decisions {sum(decided[f'{i}/{a}'] == 1 for i in expected for a in decided_for):,}"
        f" of {len(expected) * len(decided_for):,}"
    )
    strays = sum(t.messages for t in tallies.values()) - len(expected) * (len(copies_to) + len(decided_for))
    if strays:
        counts.append(f"{strays:+,} messages beyond one per event and agency")
    if len(complete) != len(expected) or strays:
        raise NotAllArrived(what, len(expected), len(complete), "; ".join(counts))
    return len(complete)


async def measure(
    settings: Settings,
    events: int,
    batch_size: int = MIB,
    seconds: float = 900,
    perf_min_records: int = PERF_MIN_RECORDS,
    *,
    processes: int = 0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Router, bare pipe and ProducerPerformance on one stack; every output proved.
    ``processes``: run the router as `tuo run router` (with ``env``) in that many
    processes rather than in this one."""
    if processes and env is None:
        raise ValueError("the router's processes need the stack's environment")
    env = env or {}
    topics = Topics(settings.topic_prefix)
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        names = await agencies(pool)
        receivers, consent_based = await _receivers(pool)
        await deploy_bus(settings, pool)  # no agency consumers here: the router needs no agency accounts
        await ensure_topics(settings, names, principal=Principal.OPERATOR)
        client = admin(settings, principal=Principal.OPERATOR)
        await client.start()
        big = {"max.message.bytes": str(max(batch_size, MIB) + 64 * 1024)}  # whole batches of --batch-mib
        await client.create_topics(
            [NewTopic(f"{topics.prefix}.bare.agency.{a}", 1, 1, topic_configs=big) for a in names]
            + [
                NewTopic(
                    f"{topics.prefix}.bare.routing-decisions",
                    settings.life_events_partitions,
                    1,
                    topic_configs=big,
                )
            ]
        )
        await client.close()
        sent = await _fill(settings, events, pool, consent_based)

        if processes:
            routed = await _router_processes(settings, env, processes, events, seconds)
        else:
            routed = await _router(settings, pool, events, seconds)
        router_out = await read_committed(
            settings, [topics.agency(a) for a in names] + [topics.routing_decisions], sample_by="/"
        )
        dead = await read_committed(settings, [topics.dead_letters])
        try:
            arrived = check_routed(
                "router",
                router_out,
                sent,
                {a: topics.agency(a) for a in receivers},
                {a: topics.agency(a) for a in names if a not in receivers},
                topics.routing_decisions,
                names,
            )
        except NotAllArrived as exc:
            raise NotAllArrived(
                "router",
                exc.sent,
                exc.arrived,
                f"{exc.args[0]}; dead letters {dead[topics.dead_letters].messages:,}",
            ) from None
        templates = Templates(
            {a: router_out[topics.agency(a)].first for a in receivers},
            router_out[topics.routing_decisions].samples,
        )
        messages = sum(t.messages for t in router_out.values())
        copies = [router_out[topics.agency(a)] for a in receivers]
        copy_size = round(sum(t.record_bytes for t in copies) / sum(t.messages for t in copies))
        decisions = router_out[topics.routing_decisions]
        decision_size = round(decisions.record_bytes / decisions.messages)
        record_size = round(sum(t.record_bytes for t in router_out.values()) / messages)

        bare = await _bare_pipe(settings, events, templates, batch_size, seconds)
        bare_out = await read_committed(
            settings,
            [f"{topics.prefix}.bare.agency.{a}" for a in names] + [f"{topics.prefix}.bare.routing-decisions"],
        )
        bare_arrived = check_routed(
            "bare pipe",
            bare_out,
            sent,
            {a: f"{topics.prefix}.bare.agency.{a}" for a in receivers},
            {a: f"{topics.prefix}.bare.agency.{a}" for a in names if a not in receivers},
            f"{topics.prefix}.bare.routing-decisions",
            names,
        )
        bare_bytes = sum(t.record_bytes for t in bare_out.values())
        router_bytes = sum(t.record_bytes for t in router_out.values())

        # Its own best settings (1 MiB batches, 10 ms linger; 16 KiB batches, the Java
        # default, managed a fifth of it here), not the bare pipe's.
        limit = await producer_performance.measure(
            settings, records=max(messages, perf_min_records), record_size=record_size, seconds=seconds
        )
    finally:
        await pool.close()
    per_event = messages / events
    limit_events = limit["records_per_s"] / per_event
    print(
        f"{events:,} DeathRegistered events, {len(names)} agencies ({len(receivers)} entitled to each event),"
        f" {settings.life_events_partitions} input partitions; {messages:,} messages out"
        f" ({per_event:g} per event, {record_size:,} bytes each on average: agency copies {copy_size:,},"
        f" decisions {decision_size:,}; key, value and headers)"
    )
    print(f"  every event reached all {len(receivers)} entitled agencies once, with one decision per agency")
    where = f"`tuo run router` in {processes} processes" if processes else "in this process"
    print(f"  router (transactions, consent, signatures, minimising; {where}): {_pace(routed)}")
    print(f"  bare aiokafka pipe, same bytes, transactions, {batch_size / MIB:g} MiB batches: {_pace(bare)}")
    print(
        f"  this broker on this machine (Kafka ProducerPerformance, {limit['sent']:,} records"
        f" of {record_size:,} bytes, acks=all): {limit['records_per_s']:,.0f} records/s"
        f" ({limit['mb_per_s']:g} MB/s) = {limit_events:,.0f} events/s"
    )
    print(
        f"  ratio router / bare: {routed.per_s / bare.per_s:.2f};"
        f" bare / broker: {bare.per_s / limit_events:.2f}"
    )
    return {
        "events": events,
        "sent": events,
        "arrived": arrived,
        "agencies": len(names),
        "entitled_agencies": receivers,
        "messages_out": messages,
        "record_bytes_mean": record_size,
        "copy_bytes_mean": copy_size,
        "decision_bytes_mean": decision_size,
        "router_bytes": router_bytes,
        "router_processes": processes or 1,
        "router_per_s": round(routed.per_s, 1),
        "router_wall_s": round(routed.wall_s, 2),
        "router_steady_per_s": _round(routed.steady_per_s),
        "bare": {
            "sent": events,
            "arrived": bare_arrived,
            "bytes": bare_bytes,
            "batch_bytes": batch_size,
            "wall_s": round(bare.wall_s, 2),
            "steady_per_s": _round(bare.steady_per_s),
        },
        "bare_per_s": round(bare.per_s, 1),
        "ratio": round(routed.per_s / bare.per_s, 3),
        "producer_performance": limit,
        "limit_per_s": round(limit_events, 1),
        "bare_to_limit": round(bare.per_s / limit_events, 3),
    }


def _pace(pace: Pace) -> str:
    steady = "" if pace.steady_per_s is None else f", {pace.steady_per_s:,.0f}/s after the first commit"
    return f"{pace.per_s:,.0f} events/s ({pace.wall_s:.1f} s{steady})"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(
    events: int, batch_mib: float = 1.0, processes: int = 0, partitions: int | None = None
) -> dict[str, Any]:
    with scratch_stack() as stack:
        settings = stack.settings("bench")
        env = stack.service_env("bench", http_port=0)
        if partitions is not None:
            settings = settings.model_copy(update={"life_events_partitions": partitions})
            env["TUO_LIFE_EVENTS_PARTITIONS"] = str(partitions)
        configure_logging(settings)
        # The bare pipe collects garbage as seldom as the router does (runtime.garbage): a fair floor.
        with fewer_collections():
            return asyncio.run(measure(settings, events, int(batch_mib * MIB), processes=processes, env=env))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-mib", type=float, default=1.0, help="the bare pipe's record batch size")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="run the router as `tuo run router` with this many processes (default: in the benchmark's own)",
    )
    parser.add_argument("--partitions", type=int, help="life-events partitions (default: the bus's setting)")
    args = parser.parse_args()
    main(args.events, args.batch_mib, args.processes, args.partitions)
