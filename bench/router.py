"""Router throughput against a bare aiokafka consume→produce pipe, in one run.

    .venv/bin/python -m bench.router [--events 20000]

Starts its own local stack (Kafka + PostgreSQL, in a scratch state directory;
every Kafka client over TLS with SASL/SCRAM, as the bus's), loads the demo
subscriptions, gives every subject consent for the consent-based agencies, and
puts N DeathRegistered events (~600 bytes) on a fresh life-events topic. Then it
measures, on the same broker and the same input:

  (a) bare pipe: a consumer reads each event and produces, per event, one copy to
      each of the 6 agencies' topics and one decision-sized message per agency,
      acks=all, idempotent — the same message count and sizes as the router;
  (b) the router: transactions per partition and batch, consent and
      subscriptions read from PostgreSQL per batch, decode, decide, minimise,
      re-encode per agency.

Prints events/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.structs import TopicPartition

from bench.scratch import bench_client_options, deploy_bus, scratch_stack
from router.seed import load_seed
from router.service import Router
from router.store import agencies
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.kafka import Topics, admin, ensure_topics
from runtime.logging import configure_logging
from runtime.settings import Settings
from tests.support import death_message, office_key


async def _fill(settings: Settings, events: int, pool: Any) -> None:
    topic = Topics(settings.topic_prefix).life_events
    producer = AIOKafkaProducer(**bench_client_options(settings), linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    consents = []
    key = await office_key(pool, settings)
    try:
        pending = []
        for _ in range(events):
            subject_id = f"s-{uuid.uuid4().hex}"
            _, value, headers = death_message(subject_id, nino="AB123456C", key=key)
            pending.append(await producer.send(topic, value, key=subject_id.encode(), headers=headers))
            consents += [(subject_id, agency) for agency in ("dvla", "hmpo")]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    await pool.executemany(
        "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
        " VALUES ($1, $2, 'DeathRegistered', 'given', 'informant')",
        consents,
    )


async def _bare_pipe(settings: Settings, events: int, agency_names: list[str]) -> float:
    topics = Topics(settings.topic_prefix)
    consumer = AIOKafkaConsumer(
        topics.life_events,
        **bench_client_options(settings),
        group_id=f"{settings.topic_prefix}.bare",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(**bench_client_options(settings), enable_idempotence=True, linger_ms=5)
    decision_sized = b"d" * 180
    await consumer.start()
    await producer.start()
    seen = 0
    started = time.perf_counter()
    try:
        while seen < events:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            pending = []
            for tp, records in batches.items():
                for record in records:
                    for agency in agency_names:
                        pending.append(
                            await producer.send(
                                f"{topics.prefix}.bare.{agency}", record.value, key=record.key
                            )
                        )
                        pending.append(
                            await producer.send(
                                f"{topics.prefix}.bare.decisions", decision_sized, key=record.key
                            )
                        )
                seen += len(records)
                await asyncio.gather(*pending)
                await consumer.commit({tp: records[-1].offset + 1})
                pending = []
    finally:
        elapsed = time.perf_counter() - started
        await consumer.stop()
        await producer.stop()
    return events / elapsed


async def _router(settings: Settings, pool: Any, events: int) -> float:
    router = Router(settings, pool)
    stop = asyncio.Event()
    topic = Topics(settings.topic_prefix).life_events
    watcher = AIOKafkaConsumer(**bench_client_options(settings), group_id=router.group_id)
    await watcher.start()
    partitions = [TopicPartition(topic, p) for p in range(settings.life_events_partitions)]
    task = asyncio.create_task(router.run(stop))
    started = time.perf_counter()
    try:
        while True:
            committed = [await watcher.committed(tp) or 0 for tp in partitions]
            if sum(committed) >= events:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        return events / (time.perf_counter() - started)
    finally:
        stop.set()
        await task
        await watcher.stop()


async def measure(settings: Settings, events: int) -> dict[str, Any]:
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        names = await agencies(pool)
        await deploy_bus(settings, pool)  # no agency consumers here: the router needs no agency accounts
        await ensure_topics(settings, names, principal=Principal.OPERATOR)
        client = admin(settings, principal=Principal.OPERATOR)
        await client.start()
        bare_topics = [f"{settings.topic_prefix}.bare.{a}" for a in names] + [
            f"{settings.topic_prefix}.bare.decisions"
        ]
        await client.create_topics([NewTopic(t, 1, 1) for t in bare_topics])
        await client.close()
        await _fill(settings, events, pool)
        bare = await _bare_pipe(settings, events, names)
        routed = await _router(settings, pool, events)
    finally:
        await pool.close()
    print(f"{events} DeathRegistered events, {len(names)} agencies, 3 input partitions, one 2-core machine")
    print(f"  bare aiokafka pipe (6 copies + 6 decision-sized messages per event): {bare:,.0f} events/s")
    print(f"  router (transactions, consent, minimisation, decisions):             {routed:,.0f} events/s")
    print(f"  ratio router / bare: {routed / bare:.2f}")
    return {
        "events": events,
        "agencies": len(names),
        "router_per_s": round(routed, 1),
        "bare_per_s": round(bare, 1),
        "ratio": round(routed / bare, 3),
    }


def main(events: int) -> dict[str, Any]:
    with scratch_stack() as stack:
        settings = stack.settings("bench")
        configure_logging(settings)
        return asyncio.run(measure(settings, events))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    main(parser.parse_args().events)
