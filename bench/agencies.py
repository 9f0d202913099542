"""The agency side of the bus: the SDK consumer's throughput against a bare
aiokafka pipe, and end-to-end latency at a steady load, in one run.

    .venv/bin/python -m bench.agencies [--events 5000] [--rate 100] [--seconds 60] [--warm-up 20]
                                       [--only throughput|latency] [--no-records]
                                       [--profile sdk.prof] [--processes 1]
                                       [--process-per-component] [--intake-processes 1]

Starts its own local stack (Kafka + PostgreSQL in a scratch state directory;
every Kafka client over TLS with SASL/SCRAM, as the bus's), loads the demo
subscriptions and offices, and issues an API token. Every event is a death
registration of a new person (own NINO, date of birth and address); unless
``--no-records``, each agency first gets records for them (tax record, pension
award, driving licence, council household) so the handlers apply the events
rather than reject them. Each part runs on its own topics.

  (1) throughput: `tuo run intake relay router` runs as a separate process and N
      registrations are submitted over HTTP, until all N routed, minimised,
      signed messages are on the DWP's topic (DWP receives deaths by statute);
      the bus is then stopped and, on that same topic:
        (a) bare pipe: a read_committed consumer in its own group reads the N
            messages and, for each, produces one receipt-sized message to a
            scratch topic, gathering the sends per batch and committing offsets
            after each batch — the SDK's loop minus decode, signature check,
            de-duplication, handler and database;
        (a') the same, also decoding each message and checking its signature
            as the SDK must: the floor for any agency that trusts only the
            offices' keys;
        (b) the SDK: one ``AgencyConsumer`` for "dwp" with the handler the bus
            gives that agency.
      Each is timed from its start until its group's committed offset passes the
      N-th message (both commit only once the batch's output is acknowledged).
      With ``--processes P`` the DWP's topic has P partitions and each of (a),
      (a') and (b) runs as P processes in one consumer group (the Kafka way an
      agency goes faster); with 1, the default, each runs in this process.
      Prints events/s for both, the ratio, and the outcomes on the receipts topic.
  (2) latency: `tuo run` with every component runs as a separate process; first
      the same load as below for ``--warm-up`` seconds (default 20), untimed, so that
      the broker's JIT and the bus's caches are warm, as in a bus that has been
      running a while. Then registrations are sent by ``wrk`` (``bench/intake.lua``,
      a body file with a person per line) on a schedule: request i due at t0 + i/rate,
      not back to back, over 32 connections; a request whose slot came while all its
      thread's connections waited for answers is counted as sent late (wrk times
      from sending). Then, for every delivery the router decided (``routing_decision``
      DELIVERED), the first final receipt (APPLIED or REJECTED) in
      ``delivery_receipt`` is awaited (60 s at most). Latency of a delivery is
      ``delivery_receipt.stored_at - intake_record.recorded_at``; of an event, the
      slowest of its deliveries. Prints the achieved submit rate and the intake's
      answer times (wrk's), p50/p99/max per delivery (with the stages on the way:
      outbox published, router decided, agency received, as the receipt says, and
      receipt stored) and per event, the outcomes, the CPU used by the bus's
      processes and by wrk, and how many deliveries had no final receipt by the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import math
import multiprocessing
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import TopicPartition

from bench.intake import WrkResult, post_deaths
from bench.proof import WorkNotDone, count_by_ce_id, percentiles, prove
from bench.scratch import BENCH_USER, ScratchStack, bench_client_options, deploy_bus, scratch_stack
from consumers.agencies import handler_for, records
from consumers.sdk import AgencyConsumer
from devstack.demo import seed_offices
from devstack.processes import free_port
from producers.accounts import issue_token
from router import store as router_store
from router.seed import load_seed
from runtime import kafka
from runtime.access import Principal
from runtime.database import migrate, open_pool
from runtime.kafka import Topics
from runtime.keyring import KeyRing
from runtime.logging import configure_logging
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import decode, models
from schemas.cloudevents import CloudEvent
from schemas.signatures import read_signature, verify
from tests.support import death_registration, read_topic, today

AGENCY = "dwp"
RECEIPT_SIZED = b"r" * 64  # an Avro DeliveryReceipt is about this size, before its headers
FILL_CONCURRENCY = 32
SETTLE_SECONDS = 60.0
LOAD_CONNECTIONS = 32  # requests in flight at most in the latency part
COUNCIL = "council-leeds"  # the registrations' addresses are in Leeds (LS)


class People:
    """Death registrations, each of a person not registered before in this run."""

    def __init__(self) -> None:
        self.issued = 0

    def registrations(self, count: int) -> list[dict[str, Any]]:
        bodies = [self._registration(self.issued + n) for n in range(count)]
        self.issued += count
        return bodies

    @staticmethod
    def _registration(n: int) -> dict[str, Any]:
        # A date of birth of their own, so DVLA (which matches on name and date of
        # birth) finds exactly one licence; a NINO and a Leeds address of their own too,
        # spread over many postcodes as real addresses are (the council looks households
        # up by postcode).
        born = date(1925, 1, 1) + timedelta(days=n % 29_000)  # born by 2004
        letters = "ABDEFGHJLNPQRSTUWXYZ"  # those an inward code may end with
        inward = f"{n // 28 % 10}{letters[n // 280 % 20]}{letters[n // 5600 % 20]}"
        return death_registration(
            deceased={
                "given_names": "Pat",
                "family_name": "Example",
                "date_of_birth": born.isoformat(),
                "nino": f"CE{n % 1_000_000:06d}{'ABCD'[n // 1_000_000 % 4]}",
            },
            last_address={
                "lines": [f"{n + 1} Example Street"],
                "town": "Leeds",
                "postcode": f"LS{n % 28 + 1} {inward}",
            },
        )


async def _seed_records(pool: asyncpg.Pool, bodies: list[dict[str, Any]]) -> str:
    """Give each agency its records of these people; say what was done."""
    started = time.perf_counter()
    paid_until = today() + timedelta(days=14)
    async with pool.acquire() as conn:
        for chunk in range(0, len(bodies), 500):
            async with conn.transaction():
                for body in bodies[chunk : chunk + 500]:
                    deceased = body["deceased"]
                    person = models.Person(
                        given_names=deceased["given_names"],
                        family_name=deceased["family_name"],
                        date_of_birth=date.fromisoformat(deceased["date_of_birth"]),
                    )
                    address = models.Address.model_validate(body["last_address"])
                    await records.open_tax_record(conn, deceased["nino"], person, address)
                    await records.award_pension(conn, deceased["nino"], 22_000, paid_until)
                    await records.issue_driving_licence(conn, person, address)
                    await records.register_household(conn, COUNCIL, address, [records.Resident(person)])
    return (
        f"records seeded for every person (hmrc tax record, dwp pension, dvla licence, {COUNCIL}"
        f" household; {time.perf_counter() - started:.0f} s, untimed)"
    )


class Bus:
    """`tuo run <components>` as a separate process, as in production."""

    def __init__(self, env: dict[str, str], components: Sequence[str]) -> None:
        self.env = env
        self.components = components
        self.base = f"http://127.0.0.1:{env['TUO_HTTP_PORT']}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, client: httpx.AsyncClient) -> None:
        self.process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "tuo"),
            "run",
            *self.components,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,  # its banner; warnings and errors still show
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await client.get(f"{self.base}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.returncode is not None:
                raise RuntimeError(f"`tuo run` exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the intake service did not start within 60 s")
            await asyncio.sleep(0.2)

    def cpu_seconds(self) -> float:
        """User + system CPU the bus has used so far: its process and the child processes
        it runs its further routers in (Linux)."""
        assert self.process is not None
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid = int(stat.parent.name)
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue  # gone meanwhile
            if pid == self.process.pid or int(fields[1]) == self.process.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def _client(env: dict[str, str], token: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{env['TUO_HTTP_PORT']}",
        timeout=30,
        limits=limits,
        headers={"Authorization": f"Bearer {token}"},
    )


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """Register one death; return the event id. A connection lost on the way (a kept-alive
    one the server closed just as it was reused, say) is tried once more with the same
    Idempotency-Key, so the death is recorded once either way (200: already recorded)."""
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    try:
        response = await client.post("/v1/death-registrations", json=body, headers=headers)
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        response = await client.post("/v1/death-registrations", json=body, headers=headers)
    if response.status_code not in (200, 201):
        raise RuntimeError(f"intake refused: {response.status_code} {response.text[:300]}")
    event_id: str = response.json()["event_id"]
    return event_id


def _outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{outcome} {count}" for outcome, count in sorted(counts.items())) or "none"


# (1) Throughput


async def _fill(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[str]:
    """Register every death; return the event ids intake gave them."""
    gate = asyncio.Semaphore(FILL_CONCURRENCY)

    async def one(body: dict[str, Any]) -> str:
        async with gate:
            return await _submit(client, body)

    return list(await asyncio.gather(*(one(body) for body in bodies)))


async def _ends_when_filled(settings: Settings, topic: str, wanted: int, seconds: float) -> dict[int, int]:
    """Wait until ``topic`` holds ``wanted`` committed messages (``seconds`` at most);
    return, per partition, the offset just past its last message."""
    deadline = time.monotonic() + seconds
    while True:
        on_topic = await read_topic(settings, topic, BENCH_USER)
        if len(on_topic) >= wanted:
            ends: dict[int, int] = {}
            for record in on_topic:
                ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
            return ends
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(on_topic)} of {wanted} messages reached {topic} in {seconds:.0f} s"
            )
        await asyncio.sleep(0.5)


async def _timed(
    settings: Settings,
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    group_id: str,
    source: str,
    ends: dict[int, int],
) -> tuple[float, float]:
    """Run ``run(stop)`` until ``group_id`` has committed ``ends`` on ``source``; return
    (seconds from its start to its first commit, to its last)."""
    watcher = AIOKafkaConsumer(**bench_client_options(settings), group_id=group_id)
    await watcher.start()
    partitions = [TopicPartition(source, p) for p in ends]
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(run(stop))
    first: float | None = None
    try:
        while True:
            committed = {tp.partition: await watcher.committed(tp) or 0 for tp in partitions}
            elapsed = time.perf_counter() - started
            if first is None and any(committed.values()):
                first = elapsed
            if all(committed[p] >= end for p, end in ends.items()):
                return first or elapsed, elapsed
            if task.done():
                task.result()
                raise RuntimeError(f"{group_id} stopped at {committed} of {ends}")
            if elapsed > 600:
                raise RuntimeError(f"{group_id} had committed {committed} of {ends} after 600 s")
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
        await watcher.stop()


async def _bare_pipe(
    settings: Settings, pool: asyncpg.Pool, source: str, name: str, stop: asyncio.Event, *, check: bool
) -> None:
    """The least an agency consumer can do and still be one: per batch, one INSERT of the
    batch's event ids (one transaction), a receipt-sized message per event, then commit
    the offsets, as the SDK does; no decode, signature check, handler or de-duplication
    beyond the primary key. With ``check``, it also decodes each message and checks its
    signature, as the SDK must (``schemas.signatures``): the floor for any agency."""
    consumer = kafka.consumer(
        settings, source, principal=BENCH_USER, group_id=f"{settings.topic_prefix}.{name}", client_id=name
    )
    producer = kafka.producer(settings, principal=BENCH_USER, client_id=name)
    keys = KeyRing.from_database(pool)
    await producer.start()
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=200)
            for tp, batch in batches.items():
                if check:
                    await _check_signatures(keys, batch)
                ids = [_ce_id(r) for r in batch]
                await pool.execute(
                    f"INSERT INTO {name.replace('-', '_')}_inbox (event_id) SELECT unnest($1::uuid[])"
                    " ON CONFLICT DO NOTHING",
                    ids,
                )
                output = f"{settings.topic_prefix}.{name}.receipts"
                pending = [
                    await producer.send(output, RECEIPT_SIZED, key=r.key, headers=[("ce_id", i.encode())])
                    for r, i in zip(batch, ids, strict=True)
                ]
                await asyncio.gather(*pending)
                try:
                    await consumer.commit({tp: batch[-1].offset + 1})
                except (CommitFailedError, IllegalStateError):
                    # Rebalanced away meanwhile (another process of the group joined):
                    # its new owner reads the batch again, as it would from the SDK.
                    continue
    finally:
        await consumer.stop()
        await producer.stop()


async def _check_signatures(keys: KeyRing, batch: list[Any]) -> None:
    signed = [read_signature(r.headers) for r in batch]
    found = await keys.resolve(s.manifest.key_id for s in signed)
    for record, signature in zip(batch, signed, strict=True):
        cloud_event = CloudEvent.from_headers(record.headers)
        _, body = decode(record.value)
        verify(
            signature,
            found.get(signature.manifest.key_id),
            event_type=cloud_event.type,
            event_id=cloud_event.id,
            source=cloud_event.source,
            body=body,
        )


def _ce_id(record: Any) -> str:
    return next((bytes(v).decode() for k, v in record.headers if k == "ce_id"), "")


SDK = "sdk"  # _consume's name for the AgencyConsumer; any other name is a bare pipe's


async def _in_processes(
    processes: int, settings: Settings, source: str, name: str
) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """Start ``processes`` child processes that will each consume ``source`` as ``name``
    (one consumer group); once every one has imported its code and opened its pool,
    return ``run(stop)`` for ``_timed``, which lets them go, so Python's start-up is not
    timed (an in-process consumer has none). ``run`` fails if a child exits early."""
    context = multiprocessing.get_context("spawn")  # a fresh Python, as `tuo run` starts
    go, stopping = context.Event(), context.Event()
    ready = [context.Event() for _ in range(processes)]
    children = [
        context.Process(
            target=_consumer_process,
            args=(settings, source, name, _Cues(ready[n], go, stopping)),
            daemon=True,
        )
        for n in range(processes)
    ]
    for child in children:
        child.start()
    for child, is_ready in zip(children, ready, strict=True):
        while not await asyncio.to_thread(is_ready.wait, 0.5):
            if not child.is_alive():
                raise RuntimeError(f"a {name} consumer process exited with {child.exitcode} at start")

    async def run(stop: asyncio.Event) -> None:
        go.set()
        try:
            while not stop.is_set():
                for child in children:
                    if not child.is_alive():
                        raise RuntimeError(f"a {name} consumer process exited with {child.exitcode}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            stopping.set()
            go.set()
            for child in children:
                await asyncio.to_thread(child.join, 60)
                if child.is_alive():
                    child.kill()

    return run


@dataclass(frozen=True)
class _Cues:
    """Between the benchmark and one consumer process: the child is ready (imported,
    pool open), it may go, it must stop."""

    ready: ProcessEvent
    go: ProcessEvent
    stopping: ProcessEvent


def _consumer_process(settings: Settings, source: str, name: str, cues: _Cues) -> None:
    configure_logging(settings)
    asyncio.run(_consume(settings, source, name, cues))


async def _consume(settings: Settings, source: str, name: str, cues: _Cues) -> None:
    pool = await open_pool(settings)
    cues.ready.set()
    await asyncio.to_thread(cues.go.wait)
    stop = asyncio.Event()

    async def until_stopped() -> None:
        await asyncio.to_thread(cues.stopping.wait)
        stop.set()

    watching = asyncio.create_task(until_stopped())
    try:
        if name == SDK:
            await AgencyConsumer(settings, pool, AGENCY, handler_for(AGENCY)).run(stop)
        else:
            await _bare_pipe(settings, pool, source, name, stop, check=name == "bare-checked")
    finally:
        cues.stopping.set()  # ends the thread waiting on it, if this ends first
        await watching
        await pool.close()


async def _baseline(
    settings: Settings,
    pool: asyncpg.Pool,
    source: str,
    ends: dict[int, int],
    accepted: set[str],
    name: str,
    *,
    check: bool,
    processes: int,
) -> tuple[float, float, int]:
    """Run one bare pipe over ``source`` on its own scratch topic and table; prove that it
    stored and answered every event; return (seconds to its first commit, to its last,
    events both stored and answered)."""
    output, table = f"{settings.topic_prefix}.{name}.receipts", f"{name.replace('-', '_')}_inbox"
    admin = kafka.admin(settings, principal=Principal.OPERATOR)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(output, 1, 1)])
    finally:
        await admin.close()
    await pool.execute(f"CREATE TABLE IF NOT EXISTS {table} (event_id uuid PRIMARY KEY)")
    first, done = await _timed(
        settings,
        (
            await _in_processes(processes, settings, source, name)
            if processes > 1
            else lambda stop: _bare_pipe(settings, pool, source, name, stop, check=check)
        ),
        f"{settings.topic_prefix}.{name}",
        source,
        ends,
    )
    stored = await pool.fetchval(
        f"SELECT count(*) FROM {table} WHERE event_id = ANY($1::uuid[])", list(accepted)
    )
    answered, _ = await count_by_ce_id(bench_client_options(settings), output, accepted)
    prove(
        f"agencies {name} pipe",
        len(accepted),
        min(stored, answered),
        f"rows stored {stored}; receipts on {output} by ce_id {answered}",
    )
    arrived: int = min(stored, answered)
    return first, done, arrived


async def _receipted(settings: Settings, topic: str, event_ids: set[str]) -> tuple[set[str], dict[str, int]]:
    """Of ``event_ids``, those with a final receipt (APPLIED or REJECTED) on ``topic``
    (read_committed); and every receipt's outcome, counted."""
    receipted: set[str] = set()
    counts: dict[str, int] = {}
    for record in await read_topic(settings, topic, BENCH_USER):
        _, body = decode(record.value or b"")
        outcome = body["outcome"] + (" (duplicate)" if body.get("duplicate") else "")
        counts[outcome] = counts.get(outcome, 0) + 1
        if str(body["event_id"]) in event_ids and body["outcome"] in ("APPLIED", "REJECTED"):
            receipted.add(str(body["event_id"]))
    return receipted, counts


async def throughput(
    settings: Settings,
    env: dict[str, str],
    pool: asyncpg.Pool,
    people: People,
    events: int,
    seed: bool,
    processes: int = 1,
) -> dict[str, Any]:
    topics = Topics(settings.topic_prefix)
    source = topics.agency(AGENCY)
    bodies = people.registrations(events)
    seeded = await _seed_records(pool, bodies) if seed else "no agency records seeded (--no-records)"
    await deploy_bus(settings, pool, [AGENCY])
    token = await issue_token(pool, "leeds", "registrar", "benchmark throughput")
    bus = Bus(env, ["intake", "relay", "router"])
    try:
        async with _client(env, token, FILL_CONCURRENCY) as client:
            await bus.start(client)
            filling = time.perf_counter()
            accepted = set(await _fill(client, bodies))
            ends = await _ends_when_filled(settings, source, events, seconds=300)
            filled_in = time.perf_counter() - filling
    finally:
        await bus.stop()
    options = bench_client_options(settings)
    on_source, _ = await count_by_ce_id(options, source, accepted)
    prove("agencies fill", events, on_source, f"registrations accepted {len(accepted)}; by ce_id on {source}")
    bare_first, bare_done, bare_arrived = await _baseline(
        settings, pool, source, ends, accepted, "bare", check=False, processes=processes
    )
    checked_first, checked_done, checked_arrived = await _baseline(
        settings, pool, source, ends, accepted, "bare-checked", check=True, processes=processes
    )
    consumer = AgencyConsumer(settings, pool, AGENCY, handler_for(AGENCY))
    with _profiled(PROFILE if processes == 1 else None):
        sdk_first, sdk_done = await _timed(
            settings,
            await _in_processes(processes, settings, source, SDK) if processes > 1 else consumer.run,
            f"{settings.topic_prefix}.agency.{AGENCY}",
            source,
            ends,
        )
    sdk_stored = await pool.fetchval(
        "SELECT count(*) FROM agency.inbox"
        " WHERE agency = $1 AND event_id = ANY($2::uuid[]) AND receipted_at IS NOT NULL",
        AGENCY,
        list(accepted),
    )
    receipted, outcomes = await _receipted(settings, topics.receipts(AGENCY), accepted)
    prove(
        "agencies consumer",
        events,
        min(sdk_stored, len(receipted)),
        f"receipted in agency.inbox {sdk_stored}; final receipts on {topics.receipts(AGENCY)}"
        f" {len(receipted)} ({_outcomes(outcomes)})",
    )

    bare, checked, sdk = events / bare_done, events / checked_done, events / sdk_done
    print(
        f"(1) agency consumer throughput: {events} routed DeathRegistered messages on {source}"
        f" (intake+relay+router put them there in {filled_in:.1f} s); one 2-core machine"
    )
    where = "in this process" if processes == 1 else f"as {processes} processes of one group"
    print(f"  {source} has {len(ends)} partition(s); each consumer below runs {where}")
    print(f"  {seeded}")
    for label, rate, first in (
        ("bare pipe (1 INSERT + 1 small message per event + commit, per batch)", bare, bare_first),
        ("the same + decode and signature check of each message", checked, checked_first),
        (f"AgencyConsumer + consumers.agencies.handler_for({AGENCY!r})", sdk, sdk_first),
    ):
        print(f"  {label:<68} {rate:7,.0f} events/s  (first commit after {first:.2f} s)")
    print(f"  ratio SDK / bare: {sdk / bare:.2f}; SDK / bare with the signature check: {sdk / checked:.2f}")
    print(f"  receipts on {topics.receipts(AGENCY)}: {_outcomes(outcomes)}")
    return {
        "events": events,
        "agency": AGENCY,
        "sent": events,
        "arrived": min(sdk_stored, len(receipted)),
        "stages": {},
        "proof": "receipted rows in agency.inbox and final receipts on the receipts topic, per event",
        "bare": {"sent": events, "arrived": min(bare_arrived, checked_arrived)},
        "processes": processes,
        "consumer_per_s": round(sdk, 1),
        "bare_per_s": round(bare, 1),
        "bare_checked_per_s": round(checked, 1),
        "ratio": round(sdk / bare, 3),
        "ratio_to_checked": round(sdk / checked, 3),
        "receipts": outcomes,
    }


PROFILE: Path | None = None  # --profile: where to write the SDK part's cProfile statistics


@contextlib.contextmanager
def _profiled(path: Path | None) -> Iterator[None]:
    """Profile this process (the SDK and its watcher) while the SDK runs; print what took
    the most CPU of its own, and keep the statistics at ``path`` for a closer look."""
    if path is None:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(path)
        print(f"  profile of the SDK part (cProfile, own time; all of it in {path}):")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)


# (2) Latency


@dataclass
class Submissions:
    accepted: list[str]  # event ids, read back from intake's records
    answers: WrkResult  # wrk's count and answer times (sent → answered)
    client_cpu: float  # CPU seconds wrk spent


async def _paced(
    pool: asyncpg.Pool, env: dict[str, str], token: str, bodies: list[dict[str, Any]], first: int, rate: float
) -> Submissions:
    """Submit ``bodies`` with wrk (``bench/intake.lua``), request i due at t0 + i/rate
    whether or not earlier ones are answered, over ``LOAD_CONNECTIONS`` connections
    (a C load generator: a Python one used a quarter of a core at 100/s, on the cores
    the bus shares, and fell behind its own schedule when they were busy). Every one
    must be answered 201; the accepted events are read back from intake's records."""
    before = {row[0] for row in await pool.fetch("SELECT event_id::text FROM intake_record")}
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as scratch:
        body_file = Path(scratch) / "registrations.jsonl"
        body_file.write_text("".join(json.dumps(body) + "\n" for body in bodies))
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        answers = await post_deaths(
            f"http://127.0.0.1:{env['TUO_HTTP_PORT']}",
            token,
            len(bodies),
            first,
            LOAD_CONNECTIONS,
            len(bodies) / rate + SETTLE_SECONDS,
            body_file,
            rate,
        )
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
    accepted = [
        row[0]
        for row in await pool.fetch("SELECT event_id::text FROM intake_record ORDER BY recorded_at")
        if row[0] not in before
    ]
    return Submissions(accepted, answers, used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime)


_DELIVERIES = """
    SELECT i.event_id, d.agency, r.outcome,
           o.published_at - i.recorded_at AS published,
           d.decided_at - i.recorded_at AS decided,
           r.received_at - i.recorded_at AS received,
           r.issued_at - i.recorded_at AS sent,
           r.stored_at - r.issued_at AS tracked,
           r.stored_at - i.recorded_at AS stored
      FROM intake_record i
      JOIN routing_decision d ON d.event_id = i.event_id AND d.outcome = 'DELIVERED'
      LEFT JOIN (SELECT event_id, min(published_at) AS published_at FROM outbox
                  WHERE event_id = ANY($1::uuid[]) GROUP BY event_id) o ON o.event_id = i.event_id
      LEFT JOIN LATERAL (
            SELECT outcome, stored_at, received_at, issued_at FROM delivery_receipt r
             WHERE r.event_id = d.event_id AND r.agency = d.agency AND r.outcome IN ('APPLIED', 'REJECTED')
             ORDER BY stored_at LIMIT 1) r ON true
     WHERE i.event_id = ANY($1::uuid[])
"""
# Polled while the bus works, so kept cheap (index lookups only): it shares the 2 cores.
_OUTSTANDING = """
    SELECT (SELECT count(*) FROM intake_record i
             WHERE i.event_id = ANY($1::uuid[])
               AND NOT EXISTS (SELECT 1 FROM routing_decision d WHERE d.event_id = i.event_id)) AS undecided,
           (SELECT count(*) FROM routing_decision d
             WHERE d.event_id = ANY($1::uuid[]) AND d.outcome = 'DELIVERED'
               AND NOT EXISTS (SELECT 1 FROM delivery_receipt r
                                WHERE r.event_id = d.event_id AND r.agency = d.agency
                                  AND r.outcome IN ('APPLIED', 'REJECTED'))) AS unreceipted
"""


async def _settle(
    pool: asyncpg.Pool, event_ids: list[str], seconds: float
) -> tuple[list[asyncpg.Record], bool]:
    """Wait until the tracker has stored every event's decisions and a final receipt
    for every delivery (``seconds`` at most); return the deliveries it has stored,
    and whether that is all of them."""
    ids = [uuid.UUID(e) for e in event_ids]
    deadline = time.monotonic() + seconds
    while True:
        outstanding = await pool.fetchrow(_OUTSTANDING, ids)
        settled = not (outstanding["undecided"] or outstanding["unreceipted"])
        if settled or time.monotonic() > deadline:
            rows: list[asyncpg.Record] = await pool.fetch(_DELIVERIES, ids)
            return rows, settled
        await asyncio.sleep(1)


Delivery = tuple[str, str]  # (event id, agency)


async def _on_topics(settings: Settings, event_ids: list[str]) -> tuple[set[Delivery], set[Delivery]]:
    """What the bus's topics say, whatever the tracker has stored: the deliveries the
    router decided for these events, and those an agency has sent a final receipt for."""
    topics = Topics(settings.topic_prefix)
    ours = set(event_ids)
    delivered: set[Delivery] = set()
    for record in await read_topic(settings, topics.routing_decisions, BENCH_USER):
        _, body = decode(record.value or b"")
        if str(body["event_id"]) in ours and body["outcome"] == "DELIVERED":
            delivered.add((str(body["event_id"]), body["agency"]))
    receipted: set[Delivery] = set()
    for agency in sorted({agency for _, agency in delivered}):
        for record in await read_topic(settings, topics.receipts(agency), BENCH_USER):
            _, body = decode(record.value or b"")
            if str(body["event_id"]) in ours and body["outcome"] in ("APPLIED", "REJECTED"):
                receipted.add((str(body["event_id"]), agency))
    return delivered, receipted


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{len(values)} value(s), too few for percentiles"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:6.0f} ms   p99 {cuts[98] * 1000:6.0f} ms   max {max(values) * 1000:6.0f} ms"


async def latency(
    settings: Settings,
    env: dict[str, str],
    pool: asyncpg.Pool,
    people: People,
    rate: float,
    seconds: float,
    seed: bool,
    warm_up_seconds: float,
) -> dict[str, Any]:
    warm_up = people.registrations(10)
    steady_warm_up = people.registrations(round(rate * warm_up_seconds))
    bodies = people.registrations(round(rate * seconds))
    seeded = (
        await _seed_records(pool, warm_up + steady_warm_up + bodies)
        if seed
        else "no agency records seeded (--no-records)"
    )
    await deploy_bus(settings, pool, await router_store.agencies(pool))  # `tuo run` runs every agency
    token = await issue_token(pool, "leeds", "registrar", "benchmark latency", timedelta(hours=2))
    bus = Bus(env, [])  # no components named: all of them
    try:
        async with _client(env, token, LOAD_CONNECTIONS) as client:
            await bus.start(client)
            # Until every consumer group has joined and a receipt has gone all the way round.
            warm = [await _submit(client, body) for body in warm_up]
            if not (await _settle(pool, warm, seconds=120))[1]:
                raise RuntimeError("the bus did not return receipts for the warm-up events within 120 s")
            if steady_warm_up:
                # The same load, untimed, until the broker's JIT and every cache have warmed
                # up, as they have in a bus that has been running for a while.
                warming = await _paced(pool, env, token, steady_warm_up, len(warm_up), rate)
                if not (await _settle(pool, warming.accepted, SETTLE_SECONDS))[1]:
                    raise RuntimeError("the bus did not return receipts for the warm-up load in time")
            cpu_before, wall_before = bus.cpu_seconds(), time.perf_counter()
            submitted = await _paced(pool, env, token, bodies, len(warm_up) + len(steady_warm_up), rate)
            waiting = time.perf_counter()
            rows, _ = await _settle(pool, submitted.accepted, SETTLE_SECONDS)
            waited = time.perf_counter() - waiting
            cpu = (bus.cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before)
    finally:
        await bus.stop()

    delivered, receipted = await _on_topics(settings, submitted.accepted)
    final = [r for r in rows if r["outcome"]]
    stored = {(str(r["event_id"]), r["agency"]) for r in final}
    outcomes: dict[str, int] = {}
    for r in final:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    # An event is complete when each of its deliveries has a final receipt stored.
    slowest: dict[str, float] = {}
    for r in final:
        event_id = str(r["event_id"])
        slowest[event_id] = max(slowest.get(event_id, 0.0), r["stored"].total_seconds())
    for event_id, _ in delivered - stored:
        slowest.pop(event_id, None)

    def stage(name: str) -> list[float]:
        return [r[name].total_seconds() for r in final if r[name] is not None]

    accepted = len(submitted.accepted)
    # Proof before any figure: every submitted event accepted, decided, and each of its
    # deliveries answered with a final receipt, on the topics and stored by the tracker.
    decided = {event_id for event_id, _ in delivered}
    complete = {
        event_id
        for event_id in slowest
        if event_id in decided and all(d in receipted for d in delivered if d[0] == event_id)
    }
    answers = submitted.answers
    prove(
        "agencies latency",
        len(bodies),
        len(complete),
        f"accepted {accepted}; deliveries decided {len(delivered)},"
        f" final receipts on the topics {len(receipted & delivered)}, stored {len(stored & delivered)};"
        f" events complete {len(complete)}",
    )
    print(
        f"(2) end-to-end latency: the whole bus as `tuo run` ({_layout(env)}), new person per event,"
        f" target {rate:g} events/s for {seconds:g} s"
        + (f" after {warm_up_seconds:g} s of the same load, untimed" if steady_warm_up else "")
        + "; one 2-core machine"
    )
    print(f"  {seeded}")
    print(
        f"  submitted {len(bodies)}, accepted {accepted};"
        f" achieved {accepted / answers.seconds:,.1f} events/s;"
        f" load generator (wrk) CPU {submitted.client_cpu / answers.seconds:.0%} of one core,"
        f" bus processes {cpu:.0%}"
    )
    print(
        f"  intake answer time (POST sent → 201, wrk's): p50 {answers.p50_ms:6.0f} ms"
        f"   p99 {answers.p99_ms:6.0f} ms"
        f"   max {answers.max_ms:6.0f} ms; sent after their slot (every connection waiting):"
        f" {answers.late} (by {answers.late_max_ms:,.0f} ms at most)"
    )
    print(
        f"  deliveries the router decided: {len(delivered)}; final receipts the agencies sent:"
        f" {len(receipted & delivered)}; stored by the tracker: {len(stored & delivered)}"
        f" ({waited:.0f} s after the last answer)"
    )
    print(
        f"  deliveries without a final receipt stored at the end: {len(delivered - stored)}"
        f" (no receipt sent yet: {len(delivered - receipted)})"
    )
    print(
        f"  per (event, agency), over the {len(final)} with a final receipt stored; from intake recorded to"
    )
    for name, label in (
        ("published", "relay published (outbox)"),
        ("decided", "router decided"),
        ("received", "agency received (receipt)"),
        ("sent", "agency sent its receipt"),
        ("stored", "receipt stored (tracker)"),
    ):
        if values := stage(name):
            print(f"    {label:<30} {_spread(values)}")
    for agency in sorted({r["agency"] for r in final}):
        mine = [r for r in final if r["agency"] == agency]
        handled = [(r["sent"] - r["received"]).total_seconds() for r in mine if r["sent"] and r["received"]]
        print(
            f"    {agency:<16} receipt stored {_spread([r['stored'].total_seconds() for r in mine])};"
            f" received → sent {_spread(handled)}"
        )
    # The tracker's own part: from the agency issuing a receipt to the tracker's commit.
    print(f"  receipt sent → stored (the tracker's lag): {_spread(stage('tracked'))}")
    per_event = list(slowest.values())
    print(f"  per event, its slowest agency, over {len(per_event)} complete events: {_spread(per_event)}")
    print(f"  final receipts stored: {_outcomes(outcomes)}")
    cuts = (
        statistics.quantiles(per_event, n=100, method="inclusive") if len(per_event) > 1 else [math.nan] * 99
    )
    stages = {
        # wrk's own percentiles (it keeps p90, not p95), from each POST sent to its answer.
        "intake answer (POST sent → 201)": {
            "count": accepted,
            "p50_ms": answers.p50_ms,
            "p90_ms": answers.p90_ms,
            "p99_ms": answers.p99_ms,
        },
        **{
            f"intake → {name}": percentiles(stage(name))
            for name in ("published", "decided", "received", "sent", "stored")
        },
        "intake → every agency's final receipt stored (per event)": percentiles(per_event),
        "receipt sent → stored (tracker)": percentiles(stage("tracked")),
    }
    return {
        "sent": len(bodies),
        "arrived": len(complete),
        "proof": "events with every delivery decided, receipted on the topics and stored by the tracker",
        "stages": stages,
        "target_per_s": rate,
        "seconds": seconds,
        "accepted": accepted,
        "achieved_per_s": round(accepted / answers.seconds, 1),
        "warm_up_s": warm_up_seconds,
        "complete_events": len(per_event),
        "deliveries_without_final_receipt": len(delivered - stored),
        "end_to_end_p50_s": round(cuts[49], 2),
        "end_to_end_p99_s": round(cuts[98], 2),
        "intake_answer_p50_s": round(answers.p50_ms / 1000, 3),
        "intake_answer_p99_s": round(answers.p99_ms / 1000, 3),
        "intake_posts_sent_late": answers.late,
    }


# Both


PROCESS_PER_COMPONENT = False  # --process-per-component: `tuo run` with TUO_PROCESS_PER_COMPONENT
INTAKE_PROCESSES = 1  # --intake-processes: `tuo run` with TUO_INTAKE_PROCESSES


def _settings(stack: ScratchStack, http_port: int, prefix: str) -> tuple[Settings, dict[str, str]]:
    """Settings for this process and the environment for `tuo run`, on topics under ``prefix``."""
    env = stack.service_env(prefix, http_port)
    if PROCESS_PER_COMPONENT:
        env["TUO_PROCESS_PER_COMPONENT"] = "true"
    env["TUO_INTAKE_PROCESSES"] = str(INTAKE_PROCESSES)
    return stack.settings(prefix), env


def _layout(env: dict[str, str]) -> str:
    intake = int(env.get("TUO_INTAKE_PROCESSES", "1"))
    also = f", and {intake - 1} more intake process{'es' if intake > 2 else ''}" if intake > 1 else ""
    if env.get("TUO_PROCESS_PER_COMPONENT") == "true":
        return f"intake in its process, every other component in a child process of its own{also}"
    return f"every component in its one process{also}"


async def measure(
    stack: ScratchStack,
    events: int,
    rate: float,
    seconds: float,
    only: str | None,
    seed: bool,
    processes: int = 1,
    warm_up: float = 20.0,
) -> dict[str, Any]:
    settings = stack.settings("bench")
    http_port = free_port()
    pool = await open_pool(settings)
    people = People()
    figures: dict[str, Any] = {}
    try:
        await migrate(pool, settings)
        await load_seed(pool)
        await seed_offices(pool, PayloadSealer.from_settings(settings))
        # Each part on its own topics: the throughput part leaves the other agencies' messages unread.
        if only in (None, "throughput"):
            settings_, env = _settings(stack, http_port, "bench-throughput")
            figures["throughput"] = await throughput(
                settings_.model_copy(update={"agency_partitions": processes}),
                env | {"TUO_AGENCY_PARTITIONS": str(processes)},
                pool,
                people,
                events,
                seed,
                processes,
            )
        if only in (None, "latency"):
            settings_, env = _settings(stack, http_port, "bench-latency")
            figures["latency"] = await latency(settings_, env, pool, people, rate, seconds, seed, warm_up)
    finally:
        await pool.close()
    # Both parts' counts, for `python -m bench`'s check; each part has proven its own.
    parts = dict(figures)
    figures["sent"] = sum(part["sent"] for part in parts.values())
    figures["arrived"] = sum(part["arrived"] for part in parts.values())
    figures["stages"] = {
        f"{name}: {stage}": cuts for name, part in parts.items() for stage, cuts in part["stages"].items()
    }
    return figures


def main(
    events: int,
    rate: float,
    seconds: float,
    only: str | None,
    seed: bool,
    processes: int = 1,
    warm_up: float = 20.0,
) -> dict[str, Any]:
    with scratch_stack() as stack:
        configure_logging(stack.settings("bench"))
        return asyncio.run(measure(stack, events, rate, seconds, only, seed, processes, warm_up))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", choices=("throughput", "latency"))
    parser.add_argument(
        "--warm-up",
        type=float,
        default=20.0,
        help="latency: seconds of the same load before the timed part, untimed (default 20; 0: none)",
    )
    parser.add_argument(
        "--records",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the agencies records of every person, so events are applied (default: yes)",
    )
    parser.add_argument("--profile", type=Path, help="profile the SDK part; statistics to this file")
    parser.add_argument(
        "--process-per-component",
        action="store_true",
        help="run the bus with TUO_PROCESS_PER_COMPONENT=true (each component but intake in a child process)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="partitions of the agency's topic, and consumer processes on each side (default 1: in this one)",
    )
    parser.add_argument(
        "--intake-processes",
        type=int,
        default=1,
        help="run the bus with TUO_INTAKE_PROCESSES (the shell's TUO_* settings never reach it)",
    )
    args = parser.parse_args()
    if args.intake_processes < 1:
        parser.error("--intake-processes must be at least 1")
    PROFILE = args.profile
    PROCESS_PER_COMPONENT = args.process_per_component
    INTAKE_PROCESSES = args.intake_processes
    try:
        main(args.events, args.rate, args.seconds, args.only, args.records, args.processes, args.warm_up)
    except WorkNotDone as failure:
        raise SystemExit(f"FAILED: {failure}") from None
