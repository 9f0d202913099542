"""Replay throughput: stored events replayed to one agency, against a bare pipe.

    .venv/bin/python -m bench.replay [--events 1000000]

Starts its own local stack (Kafka + PostgreSQL in a scratch state directory, TLS
and SASL/SCRAM as always) and stores N DeathRegistered events the way intake
stores them: an intake record and an outbox row each, signed by a registration
office, sealed with AES-256-GCM, published. Every subject is a different person.
Then, on the same broker and the same stored rows, it measures:

The stored events are copies of 2,000 genuinely signed ones, each with a new
event id and a new subject swapped into its bytes (signing a million would take
longer than the benchmark): their signatures no longer verify, which changes no
work here, since replay reads sealed (authenticated) stored rows and leaves
signature checks to the agency's SDK.

  (a) bare pipe: read the stored rows from PostgreSQL in the same batches and
      send each one's stored bytes, unopened and undecided, to a scratch topic in
      whole Kafka record batches, acks=all, idempotent;
  (b) replay: `tuo replay run dwp --everything` without a rate limit, as the
      operator runs it: open each seal, decode, decide on today's subscriptions
      and consent (read per batch), minimise and re-encode for the agency, send,
      and record each batch's position, counts and deliveries in PostgreSQL.

Prints events/s for both, the ratio, and checks the agency's topic holds every
event the replay says it sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.partitioner import murmur2

from bench.scratch import ScratchStack, bench_client_options, deploy_bus, scratch_stack
from router import replay
from router.seed import load_seed
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.kafka import Topics, admin
from runtime.logging import configure_logging
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.support import death_message, office_key

AGENCY = "dwp"  # statutory for deaths in the demo subscriptions: every stored death is entitled
CHUNK = 10_000
TEMPLATES = 2_000  # genuinely signed events; the rest are copies of them (see _make_rows)


Template = tuple[str, str, bytes, str]  # event id, subject id, value, headers (JSON)


def _make_rows(
    args: tuple[int, list[Template], str, str, str],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """One chunk of stored events (intake records, outbox rows), built in a worker process:
    copies of genuinely signed events, each with a new event id and a new person."""
    count, templates, data_key, topic, office = args
    sealer = PayloadSealer.from_settings(Settings(data_key=data_key))
    now = datetime.now(UTC)
    records, outbox = [], []
    for i in range(count):
        old_id, old_subject, value, headers = templates[i % len(templates)]
        event = uuid.uuid4()
        subject_id = f"s-{uuid.uuid4().hex}"
        # Same lengths, so the Avro body stays valid: the id and subject swapped in place.
        for old, new in ((old_id, str(event)), (old_subject, subject_id)):
            value = value.replace(old.encode(), new.encode())
            headers = headers.replace(old, new)
        reference = f"TUO-BENCH-{event.hex[:12].upper()}"
        records.append((reference, event, "DeathRegistered", subject_id, office, "bench", now))
        outbox.append((event, topic, subject_id.encode(), sealer.seal(value, event), headers, now, now))
    return records, outbox


async def _store(settings: Settings, pool: asyncpg.Pool, events: int) -> float:
    key = await office_key(pool, settings)
    templates: list[Template] = []
    for _ in range(TEMPLATES):
        subject_id = f"s-{uuid.uuid4().hex}"
        event_id, value, headers = death_message(subject_id, nino=None, key=key)
        templates.append((event_id, subject_id, value, json.dumps([[k, v.decode()] for k, v in headers])))
    assert settings.data_key is not None
    data_key, topic = settings.data_key.get_secret_value(), Topics(settings.topic_prefix).life_events
    started = time.perf_counter()
    job = (templates, data_key, topic, key.office)
    chunks = [(min(CHUNK, events - i), *job) for i in range(0, events, CHUNK)]
    with multiprocessing.Pool(2) as workers:
        for n, (records, outbox) in enumerate(workers.imap_unordered(_make_rows, chunks), 1):
            async with pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    "intake_record",
                    records=records,
                    columns=[
                        "reference",
                        "event_id",
                        "event_type",
                        "subject_id",
                        "registration_office",
                        "recorded_by",
                        "recorded_at",
                    ],
                )
                await conn.copy_records_to_table(
                    "outbox",
                    records=outbox,
                    columns=[
                        "event_id",
                        "topic",
                        "message_key",
                        "message_value",
                        "headers",
                        "created_at",
                        "published_at",
                    ],
                )
            if n % 20 == 0 or n == len(chunks):
                print(f"  stored {min(n * CHUNK, events):,} of {events:,}", flush=True)
    await pool.execute("ANALYZE intake_record; ANALYZE outbox")
    return time.perf_counter() - started


async def _bare_pipe(settings: Settings, pool: asyncpg.Pool, topic: str, partitions: int) -> float:
    """Stored rows → Kafka as they are: the floor under any replay on this machine."""
    producer = AIOKafkaProducer(
        **bench_client_options(settings), enable_idempotence=True, linger_ms=20, max_batch_size=1024 * 1024
    )
    await producer.start()
    sent = 0
    started = time.perf_counter()
    try:
        after = 0
        pending: asyncio.Future[list[asyncpg.Record]] = asyncio.ensure_future(_rows(pool, settings, after))
        while rows := await pending:
            after = rows[-1]["id"]
            pending = asyncio.ensure_future(_rows(pool, settings, after))
            builders: dict[int, Any] = {}
            futures = []
            for row in rows:
                key = row["message_key"]
                partition = (murmur2(key) & 0x7FFFFFFF) % partitions
                headers = [(k, v.encode()) for k, v in json.loads(row["headers"])]
                builder = builders.setdefault(partition, producer.create_batch())
                if (
                    builder.append(key=key, value=row["message_value"], timestamp=None, headers=headers)
                    is None
                ):
                    futures.append(await producer.send_batch(builder, topic, partition=partition))
                    builder = builders[partition] = producer.create_batch()
                    builder.append(key=key, value=row["message_value"], timestamp=None, headers=headers)
            for partition, builder in builders.items():
                futures.append(await producer.send_batch(builder, topic, partition=partition))
            await asyncio.gather(*futures)
            sent += len(rows)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def _rows(pool: asyncpg.Pool, settings: Settings, after: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT o.id, o.message_key, o.message_value, o.headers"
        "  FROM outbox o JOIN intake_record i USING (event_id)"
        " WHERE o.topic = $1 AND o.id > $2 ORDER BY o.id LIMIT $3",
        Topics(settings.topic_prefix).life_events,
        after,
        replay.BATCH_SIZE,
    )
    return rows


async def _on_topic(settings: Settings, topic: str) -> int:
    """Messages on ``topic`` now (every partition's end offset)."""
    consumer = AIOKafkaConsumer(topic, **bench_client_options(settings), isolation_level="read_committed")
    await consumer.start()
    try:
        for _ in range(100):  # no group: every partition is assigned once metadata arrives
            if consumer.assignment():
                break
            await asyncio.sleep(0.1)
        return sum((await consumer.end_offsets(list(consumer.assignment()))).values())
    finally:
        await consumer.stop()


async def run(stack: ScratchStack, events: int) -> dict[str, Any]:
    settings = stack.settings("bench")
    configure_logging(settings)
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        await deploy_bus(settings, pool, [AGENCY])
        topic = Topics(settings.topic_prefix).agency(AGENCY)
        partitions = 3
        client = admin(settings, principal=Principal.OPERATOR)
        await client.start()
        scratch = f"{settings.topic_prefix}.bare-replay"
        await client.create_topics([NewTopic(scratch, partitions, 1)])
        await client.close()

        print(f"Storing {events:,} signed, sealed death registrations (2 worker processes)…", flush=True)
        seeded = await _store(settings, pool, events)
        print(f"  stored in {seeded:.1f} s ({events / seeded:,.0f} events/s)", flush=True)

        bare = await _bare_pipe(settings, pool, scratch, partitions)
        print(f"bare pipe (stored bytes → Kafka): {events / bare:,.0f} events/s ({bare:.1f} s)", flush=True)

        chosen = await replay.start(
            pool,
            settings,
            agency=AGENCY,
            selection=replay.Selection.of(everything=True),
            reason="benchmark",
            requested_by="bench",
            rate=replay.MAX_RATE,
        )
        started = time.perf_counter()
        done = await replay.Replayer(settings, pool, chosen).run()
        took = time.perf_counter() - started
        on_topic = await _on_topic(settings, topic)
        print(f"replay to {AGENCY}: {done.tally.examined / took:,.0f} events/s ({took:.1f} s)")
        print(
            f"  sent {done.tally.sent:,} of {done.tally.examined:,};"
            f" withheld {dict(done.tally.withheld)}; on the topic: {on_topic:,}"
        )
        print(f"ratio replay / bare pipe: {bare / took:.2f}")
        return {
            "events": events,
            "agency": AGENCY,
            "replay_per_s": round(done.tally.examined / took, 1),
            "bare_per_s": round(events / bare, 1),
            "ratio": round(bare / took, 3),
            "sent": done.tally.sent,
            "on_topic": on_topic,
        }
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    measure(parser.parse_args().events)


def measure(events: int) -> dict[str, Any]:
    with scratch_stack() as stack:
        return asyncio.run(run(stack, events))


if __name__ == "__main__":
    main()
