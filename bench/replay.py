"""Replay throughput: stored events replayed to one agency, against a bare pipe.

    .venv/bin/python -m bench.replay [--events 1000000]

Starts its own local stack (Kafka + PostgreSQL in a scratch state directory, TLS
and SASL/SCRAM as always) and stores N DeathRegistered events the way intake
stores them: an intake record and an outbox row each, signed by a registration
office's sealed key (built as intake builds them: ``tests.support.death_message``
is intake's encoding, CloudEvents headers and office signature), the body sealed
with AES-256-GCM, published. Every subject is a different person, and every event
is signed for itself, so each one's signature verifies as the router checks it.
Signing and keeping the routing facts take about 0.7 ms of CPU an event: it is shared between two worker
processes started with ``spawn`` (never ``fork``: a forked worker can inherit a lock
held by one of the event loop's threads and hang), and each chunk of rows is copied
into PostgreSQL with COPY. Then, on the same broker and the same stored rows:

  (a) bare pipe: read the stored rows from PostgreSQL in the same batches and
      send each one's stored bytes, unopened and undecided, to a scratch topic in
      whole Kafka record batches, acks=all, idempotent;
  (b) replay: `tuo replay run dwp --everything` without a rate limit, as the
      operator runs it: open each event's routing facts (kept as intake keeps
      them, ``router.facts``) and its seal, decide on today's subscriptions and
      consent (read per batch), splice the agency's copy from the stored bytes,
      send, and record each batch's position, counts and deliveries in PostgreSQL;
  (c) withdrawal mid-replay: every stored event replayed to dvla, told of deaths
      only on consent, given for every other subject; once a fifth is decided,
      some of those subjects withdraw. Every consented event must arrive, and none
      of a subject who withdrew.

Before it prints a rate, each proves its work: the events on its topic, counted
by ``ce_id`` under read_committed, are every stored event (``bench.proof``). If
not, it fails with the counts. ``--fixture unsigned`` stores the same events
without their signatures, which the replay must refuse to send: it shows that
the benchmark then fails instead of printing a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bench.proof import WorkNotDone, ce_ids_on, count_by_ce_id, percentiles, prove
from bench.scratch import ScratchStack, bench_client_options, deploy_bus, scratch_stack
from operators import replay
from producers.office_keys import SigningKey
from router import facts as routing_facts
from router.seed import load_seed
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.garbage import fewer_collections
from runtime.kafka import Topics, admin, partition_of
from runtime.logging import configure_logging
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.signatures import SIGNATURE_HEADERS
from tests.support import death_message, office_key

AGENCY = "dwp"  # statutory for deaths in the demo subscriptions: every stored death is entitled
CONSENT_AGENCY = "dvla"  # told of deaths only on the informant's consent
CHUNK = 10_000  # events signed by one worker and copied in one transaction
WORKERS = 2  # signing processes (the development machine has 2 cores)

Fixture = Literal["signed", "unsigned"]
Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]  # intake records, outbox rows


def _signed_rows(
    count: int, private_key: bytes, key_id: str, office: str, data_key: str, topic: str, fixture: str
) -> Rows:
    """One chunk of stored events (intake records, outbox rows), built in a worker
    process: each a new person's death, encoded, signed and sealed as intake does it
    (``fixture="unsigned"``: without the signature headers, deliberately broken)."""
    key = SigningKey(key_id, office, Ed25519PrivateKey.from_private_bytes(private_key))
    sealer = PayloadSealer.from_settings(Settings(data_key=data_key))
    now = datetime.now(UTC)
    records, outbox = [], []
    for _ in range(count):
        subject_id = f"s-{uuid.uuid4().hex}"
        event_id, value, headers = death_message(subject_id, nino=None, key=key)
        if fixture == "unsigned":
            headers = [(k, v) for k, v in headers if k not in SIGNATURE_HEADERS]
        event = uuid.UUID(event_id)
        stored_headers = json.dumps([[k, v.decode()] for k, v in headers])
        reference = f"TUO-BENCH-{event.hex[:12].upper()}"
        records.append((reference, event, "DeathRegistered", subject_id, office, "bench", now))
        message_key = subject_id.encode()
        facts = routing_facts.seal(sealer, event, message_key, value, headers)  # as intake keeps them
        outbox.append((event, topic, message_key, sealer.seal(value, event), stored_headers, facts, now, now))
    return records, outbox


async def _copy(pool: asyncpg.Pool, rows: Rows) -> None:
    records, outbox = rows
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
                "routing_facts",
                "created_at",
                "published_at",
            ],
        )


async def _store(
    settings: Settings, pool: asyncpg.Pool, events: int, fixture: Fixture
) -> tuple[float, set[str]]:
    """Store ``events`` signed, sealed deaths; return the seconds it took and their ids."""
    key = await office_key(pool, settings)
    raw = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert settings.data_key is not None
    data_key, topic = settings.data_key.get_secret_value(), Topics(settings.topic_prefix).life_events
    chunk = min(CHUNK, max(1, math.ceil(events / WORKERS)))
    sizes = [min(chunk, events - i) for i in range(0, events, chunk)]
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    stored: set[str] = set()
    # spawn: a fresh interpreter per worker, sharing no lock with this process's threads.
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as workers:
        signing = [
            loop.run_in_executor(
                workers, _signed_rows, size, raw, key.key_id, key.office, data_key, topic, fixture
            )
            for size in sizes
        ]
        for n, done in enumerate(asyncio.as_completed(signing), 1):
            rows = await done
            await _copy(pool, rows)
            stored.update(str(row[1]) for row in rows[0])
            if n % 20 == 0 or n == len(sizes):
                print(f"  stored {len(stored):,} of {events:,}", flush=True)
    await pool.execute("ANALYZE intake_record; ANALYZE outbox")
    return time.perf_counter() - started, stored


async def _bare_pipe(
    settings: Settings, pool: asyncpg.Pool, topic: str, partitions: int
) -> tuple[float, int, list[float]]:
    """Stored rows → Kafka as they are: the floor under any replay on this machine.
    Returns (seconds, rows sent, seconds per batch)."""
    producer = AIOKafkaProducer(
        **bench_client_options(settings), enable_idempotence=True, linger_ms=20, max_batch_size=1024 * 1024
    )
    await producer.start()
    sent = 0
    batches: list[float] = []
    started = time.perf_counter()
    try:
        after = 0
        pending: asyncio.Future[list[asyncpg.Record]] = asyncio.ensure_future(_rows(pool, settings, after))
        while rows := await pending:
            began = time.perf_counter()
            after = rows[-1]["id"]
            pending = asyncio.ensure_future(_rows(pool, settings, after))
            builders: dict[int, Any] = {}
            futures = []
            for row in rows:
                key = row["message_key"]
                partition = partition_of(key, partitions)
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
            batches.append(time.perf_counter() - began)
    finally:
        await producer.stop()
    return time.perf_counter() - started, sent, batches


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


async def run(stack: ScratchStack, events: int, fixture: Fixture = "signed") -> dict[str, Any]:
    """Store ``events``, pipe them bare, replay them; prove both, then print and return
    the figures (``sent``: events stored; ``arrived``: replayed events on the agency's
    topic). Raises ``WorkNotDone`` with the counts when any stored event is missing."""
    settings = stack.settings("bench")
    configure_logging(settings)
    pool = await open_pool(settings)
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        await deploy_bus(settings, pool, [AGENCY, CONSENT_AGENCY])
        topic = Topics(settings.topic_prefix).agency(AGENCY)
        partitions = 3
        client = admin(settings, principal=Principal.OPERATOR)
        await client.start()
        scratch = f"{settings.topic_prefix}.bare-replay"
        await client.create_topics([NewTopic(scratch, partitions, 1)])
        await client.close()

        print(
            f"Storing {events:,} {fixture} death registrations ({WORKERS} spawned signing processes)…",
            flush=True,
        )
        seeded, stored = await _store(settings, pool, events, fixture)
        in_database = await pool.fetchval(
            "SELECT count(*) FROM outbox o JOIN intake_record i USING (event_id) WHERE o.topic = $1",
            Topics(settings.topic_prefix).life_events,
        )
        prove(
            "replay fixture",
            events,
            in_database,
            f"events built {len(stored):,}; stored, as PostgreSQL counts",
        )
        print(f"  stored in {seeded:.1f} s ({events / seeded:,.0f} events/s, untimed)", flush=True)

        bare, piped, bare_batches = await _bare_pipe(settings, pool, scratch, partitions)
        bare_on_topic, _ = await count_by_ce_id(bench_client_options(settings), scratch, stored)
        prove("replay bare pipe", events, bare_on_topic, f"rows read {piped:,}; distinct ce_id on {scratch}")
        print(f"bare pipe (stored bytes → Kafka): {events / bare:,.0f} events/s ({bare:.1f} s)", flush=True)

        chosen = await _everything(pool, settings, AGENCY, "benchmark")
        batches: list[float] = []
        last = time.perf_counter()

        def batch_done(_: replay.Tally) -> None:
            nonlocal last
            now = time.perf_counter()
            batches.append(now - last)
            last = now

        started = last = time.perf_counter()
        done = await replay.Replayer(settings, pool, chosen).run(on_progress=batch_done)
        took = time.perf_counter() - started
        on_topic, messages = await count_by_ce_id(bench_client_options(settings), topic, stored)
        tally = done.tally
        prove(
            "replay",
            events,
            on_topic,
            f"distinct ce_id of stored events on {topic} ({messages:,} messages); the replay's own tally:"
            f" sent {tally.sent:,} of {tally.examined:,}, withheld {dict(tally.withheld)}",
        )
        print(f"replay to {AGENCY}: {events / took:,.0f} events/s ({took:.1f} s)")
        print(f"  sent {tally.sent:,} of {tally.examined:,}; on the topic: {on_topic:,} (by ce_id)")
        print(f"ratio replay / bare pipe: {bare / took:.2f}")
        withdrawal = await _withdrawal_mid_replay(settings, pool)
        return {
            "events": events,
            "agency": AGENCY,
            "sent": events,
            "arrived": on_topic,
            "proof": f"stored events counted by ce_id on {topic}, read_committed",
            "replay_per_s": round(events / took, 1),
            "bare_per_s": round(events / bare, 1),
            "ratio": round(bare / took, 3),
            "replay_tally": {
                "sent": tally.sent,
                "examined": tally.examined,
                "withheld": dict(tally.withheld),
            },
            "bare": {"sent": events, "arrived": bare_on_topic, "seconds": round(bare, 2)},
            "stages": {
                "replay batch (read, open, decide, splice, send, record)": percentiles(batches),
                "bare pipe batch (read, send)": percentiles(bare_batches),
            },
            "fixture_seconds": round(seeded, 1),
            "withdrawal_mid_replay": withdrawal,
        }
    finally:
        await pool.close()


async def _everything(pool: asyncpg.Pool, settings: Settings, agency: str, reason: str) -> replay.Replay:
    """A replay of every stored event to ``agency``, recorded and unthrottled."""
    return await replay.start(
        pool,
        settings,
        agency=agency,
        selection=replay.Selection.of(everything=True),
        reason=reason,
        requested_by="bench",
        rate=replay.MAX_RATE,
    )


async def _withdrawal_mid_replay(settings: Settings, pool: asyncpg.Pool) -> dict[str, Any]:
    """A replay of every stored event to an agency told only on the informant's consent:
    consent given for every other subject, then withdrawn for some of those while the
    replay runs, once it has decided a fifth of the events, for subjects whose events
    lie in the last fifth. Every consented event must arrive, and none of a subject who
    withdrew: their events are decided after the withdrawal is confirmed."""
    life_events = Topics(settings.topic_prefix).life_events
    rows = await pool.fetch(
        "SELECT o.event_id::text AS event_id, convert_from(o.message_key, 'UTF8') AS subject"
        "  FROM outbox o JOIN intake_record i USING (event_id) WHERE o.topic = $1 ORDER BY o.id",
        life_events,
    )
    total = len(rows)
    consented = [(n, r) for n, r in enumerate(rows) if n % 2 == 0]
    withdrawing = [r for n, r in consented if n >= total * 4 // 5][::2]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "consent_record",
            records=[
                (r["subject"], CONSENT_AGENCY, "DeathRegistered", "given", "informant") for _, r in consented
            ],
            columns=["subject_id", "agency", "event_type", "choice", "recorded_by"],
        )
    expected = {r["event_id"] for _, r in consented} - {r["event_id"] for r in withdrawing}
    print(
        f"Withdrawal mid-replay: {total:,} events to {CONSENT_AGENCY} (consent only), consent given for"
        f" {len(consented):,}; {len(withdrawing):,} of those withdraw once a fifth is decided…",
        flush=True,
    )
    chosen = await _everything(pool, settings, CONSENT_AGENCY, "benchmark: withdrawal mid-replay")
    examined = 0
    due = asyncio.Event()
    confirmed_at: list[int] = []  # events decided when the withdrawal committed

    def batch_done(tally: replay.Tally) -> None:
        nonlocal examined
        examined = tally.examined
        if examined >= total // 5:
            due.set()

    async def withdraw() -> None:
        await due.wait()
        await pool.execute(
            "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
            " SELECT s, $2, 'DeathRegistered', 'withdrawn', 'citizen' FROM unnest($1::text[]) AS s",
            [r["subject"] for r in withdrawing],
            CONSENT_AGENCY,
        )
        confirmed_at.append(examined)

    withdrawing_task = asyncio.create_task(withdraw())
    started = time.perf_counter()
    batch = min(replay.BATCH_SIZE, max(1, total // 20))  # a small run still has batches to withdraw between
    done = await replay.Replayer(settings, pool, chosen, batch_size=batch).run(on_progress=batch_done)
    took = time.perf_counter() - started
    await withdrawing_task
    # The batch being decided as the withdrawal committed may have read consent before it;
    # every later batch reads it after. The withdrawn subjects' events must lie beyond both.
    if confirmed_at[0] + 2 * batch > total * 4 // 5:
        raise WorkNotDone(
            "withdrawal mid-replay",
            len(expected),
            None,
            f"the withdrawal committed after {confirmed_at[0]:,} events were decided: too late to test",
        )
    topic = Topics(settings.topic_prefix).agency(CONSENT_AGENCY)
    found, messages = await ce_ids_on(bench_client_options(settings), topic)
    unentitled = found - expected
    if unentitled:
        raise WorkNotDone(
            "withdrawal mid-replay",
            len(expected),
            len(found & expected),
            f"{len(unentitled):,} events reached {CONSENT_AGENCY} without consent or after a withdrawal",
        )
    prove(
        "withdrawal mid-replay",
        len(expected),
        len(found),
        f"consented, not withdrawn, events counted by ce_id on {topic} ({messages:,} messages)",
    )
    tally = done.tally
    print(
        f"  withdrawal confirmed after {confirmed_at[0]:,} events were decided; sent {tally.sent:,},"
        f" withheld {dict(tally.withheld)}; on the topic: {len(found):,}, none of a subject who withdrew"
    )
    print(f"replay to {CONSENT_AGENCY} (consent read per batch): {total / took:,.0f} events/s ({took:.1f} s)")
    return {
        "sent": len(expected),
        "arrived": len(found),
        "consented": len(consented),
        "withdrawn": len(withdrawing),
        "withdrawal_confirmed_after_events": confirmed_at[0],
        "replay_per_s": round(total / took, 1),
        "replay_tally": {"sent": tally.sent, "examined": tally.examined, "withheld": dict(tally.withheld)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--fixture",
        choices=("signed", "unsigned"),
        default="signed",
        help="unsigned: a deliberately broken fixture, to see the benchmark refuse to print a rate",
    )
    args = parser.parse_args()
    try:
        measure(args.events, args.fixture)
    except WorkNotDone as failure:
        raise SystemExit(f"FAILED: {failure}") from None


def measure(events: int, fixture: Fixture = "signed") -> dict[str, Any]:
    # The bare pipe collects garbage as seldom as a replay does (runtime.garbage): a fair floor.
    with scratch_stack() as stack, fewer_collections():
        return asyncio.run(run(stack, events, fixture))


if __name__ == "__main__":
    main()
