"""The whole bus under faults, in a world of its own: its own local stack (so its
Kafka broker and PostgreSQL server may be restarted), every component as its own
`tuo run <component>` process, and a registrar system submitting deaths through the
intake API at a steady pace. Meanwhile, at random moments (a seeded plan, printed),
the relay, the router, the agency consumers and the receipt tracker are SIGKILLed
and restarted, the broker is restarted and PostgreSQL is restarted.

Afterwards every accepted event has reached every entitled agency exactly once (on
its topic, read_committed, and in its inbox), no agency has an event it has no
basis for, every delivery has exactly one final receipt, and the audit chain of
routing decisions verifies. Entitlement is worked out here from the seed
subscriptions and the consent each registration gave, not by the router's rules.

Run it with ``.venv/bin/pytest -m faults``; TUO_FAULT_SEED=<n> replays a plan.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack import LocalStack
from devstack.demo import seed_agency_records, seed_offices
from devstack.kafka import ensure_tool_jars
from devstack.postgres import PostgresServer
from devstack.processes import free_port, terminate
from producers.accounts import issue_token
from router import audit
from router.seed import load_seed, read_seed
from runtime.access import onboard_subscribed_agencies
from runtime.database import migrate, open_pool
from runtime.kafka import Topics
from runtime.local_authorities import local_authority
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from tests.conftest import CACHE_DIR, KAFKA_VERSION, PROJECT, new_state_dir, processes_mentioning
from tests.support import (
    death_registration,
    eventually,
    grant_inspector,
    header,
    kafka_log_evidence,
    read_topic,
    settings_from_stack,
    today,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

TUO = str(Path(sys.executable).parent / "tuo")
KILLED = ("relay", "router", "agencies", "tracker")  # each SIGKILLed at random moments
KILLS_EACH = 2
LOAD_SECONDS = 60.0
EVENTS_PER_SECOND = 12.0
# The bus drains until every delivery has its final receipt; it is stuck if no receipt
# arrives for STALLED_SECONDS (a loaded machine is slow, not stuck), and at most DRAIN_SECONDS.
STALLED_SECONDS = 150.0  # longer than the router takes to give up on a stuck batch (60 s) and restart
DRAIN_SECONDS = 300.0
FINAL_OUTCOMES = ("APPLIED", "REJECTED")
# Where the deceased last lived: two councils' areas (statutory, by postcode) and elsewhere.
POSTCODES = ("LS1 4AP", "LS11 5DT", "BD1 1HY", "BD10 8QS", "M1 1AE", "YO1 7HH")


# --- Entitlement, worked out independently of the router --------------------------------


def entitled_agencies(postcode: str, consents: dict[str, str]) -> frozenset[str]:
    """Agencies a death at ``postcode`` must reach: a statutory subscription whose local
    authorities (if any) include the address's (ONS Postcode Directory), or a consent
    subscription the registration gave consent for."""
    entitled = set()
    for sub in read_seed():
        if sub["event_type"] != "DeathRegistered":
            continue
        authorities = (sub.get("condition") or {}).get("local_authorities", [])
        if authorities and local_authority(postcode) not in authorities:
            continue
        if sub["legal_basis"] == "statutory" or consents.get(sub["agency"]) == "given":
            entitled.add(sub["agency"])
    return frozenset(entitled)


def consent_agencies() -> list[str]:
    return sorted(
        s["agency"]
        for s in read_seed()
        if s["event_type"] == "DeathRegistered" and s["legal_basis"] == "consent"
    )


def subscribed_agencies() -> list[str]:
    return sorted({s["agency"] for s in read_seed()})


# --- The world: a stack of its own and the bus as separate processes -------------------


@dataclass
class BusProcess:
    """One `tuo run <component>`, which the test may SIGKILL and start again."""

    component: str
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    exited_by_itself: list[int] = field(default_factory=list)  # exit codes nobody asked for

    async def start(self) -> None:
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.process = await asyncio.create_subprocess_exec(
                TUO,
                "run",
                self.component,
                cwd=PROJECT,
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int | None:
        """SIGTERM; the exit code (None if it had to be killed after 30 s)."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=30)
            except TimeoutError:
                await self.kill()
                return None
        return self.process.returncode


@dataclass
class FaultWorld:
    stack: LocalStack
    settings: Settings
    pool: asyncpg.Pool
    token: str
    http_port: int
    home: Path  # the components' logs
    processes: dict[str, BusProcess] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def service_env(self) -> dict[str, str]:
        """The stack's own TUO_* settings (as its clients read them), none of this shell's."""
        stack_env = dict(
            line.split("=", 1) for line in self.stack.env_file.read_text().splitlines() if "=" in line
        )
        return {
            **{name: value for name, value in os.environ.items() if not name.startswith("TUO_")},
            **stack_env,
            "TUO_STATE_DIR": str(self.stack.state_dir),
            "TUO_CACHE_DIR": str(CACHE_DIR),
            "TUO_HTTP_PORT": str(self.http_port),
            "TUO_LOG_LEVEL": "INFO",
            "TUO_LOG_FORMAT": "json",
            # One registrar system is the whole load: its allowance must not be the limit.
            "TUO_HTTP_RATE_LIMIT_PER_MINUTE": "1000000",
            "TUO_OVERDUE_CHECK_SECONDS": "5",
        }

    def postgres(self) -> PostgresServer:
        """The stack's PostgreSQL server, from the ports and directory it recorded."""
        layout = json.loads(self.stack.layout_file.read_text())
        return PostgresServer(
            home=Path(layout["postgres_home"]),
            port=layout["postgres_port"],
            password=layout["postgres_password"],
        )

    def restart_broker(self) -> str:
        """Stop the broker (SIGTERM, as an operator would) and start it again."""
        pid = self.stack.status().kafka_pid
        assert pid is not None, "the stack's broker is not running"
        started = time.monotonic()
        terminate(pid, grace_seconds=30)
        stopped = time.monotonic()
        self.stack.up()  # starts what is not running; keeps data, passwords and ACLs
        return f"stop {stopped - started:.1f}s, start {time.monotonic() - stopped:.1f}s"

    def restart_postgres(self, down_seconds: float) -> str:
        server = self.postgres()
        started = time.monotonic()
        server.stop()
        stopped = time.monotonic()
        time.sleep(down_seconds)
        down = time.monotonic()
        server.start()
        return (
            f"stop {stopped - started:.1f}s, down {down - stopped:.1f}s, start {time.monotonic() - down:.1f}s"
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[FaultWorld]:
    state_dir = new_state_dir("faults-")
    stack = LocalStack(state_dir, CACHE_DIR, KAFKA_VERSION, heap="512m")
    try:
        await asyncio.to_thread(stack.up)
        settings = settings_from_stack(
            stack.env_file, state_dir=state_dir, cache_dir=CACHE_DIR, log_level="WARNING"
        )
        await grant_inspector(settings)
        pool = await open_pool(settings)
        try:
            await migrate(pool, settings)
            await load_seed(pool)
            await seed_offices(pool, PayloadSealer.from_settings(settings))
            await seed_agency_records(pool, today())
            await onboard_subscribed_agencies(settings, pool, by="fault suite")
            token = await issue_token(pool, "leeds", "registrar", "fault suite")
            world = FaultWorld(stack, settings, pool, token, free_port(), tmp_path)
            try:
                yield world
            finally:
                for process in world.processes.values():
                    await process.stop()
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(stack.purge)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not processes_mentioning(str(state_dir)), "the fault suite's stack still runs"


# --- Load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    event_id: str
    reference: str
    postcode: str
    consents: dict[str, str]

    @property
    def entitled(self) -> frozenset[str]:
        return entitled_agencies(self.postcode, self.consents)


@dataclass
class Load:
    accepted: list[Accepted] = field(default_factory=list)
    refused_attempts: Counter[str] = field(default_factory=Counter)  # why an attempt failed
    given_up: list[str] = field(default_factory=list)  # idempotency keys never acknowledged
    rejected: list[str] = field(default_factory=list)  # 4xx answers: a mistake in this test
    # Acknowledged only on a retry that found the event already stored (200, not 201):
    # an attempt that failed in the client's eyes had been accepted after all.
    stored_before: int = 0
    seconds: float = 0.0  # how long registrations were submitted


async def submit(client: httpx.AsyncClient, rng: random.Random, load: Load, patience: float) -> None:
    """One registration, retried with the same Idempotency-Key until intake acknowledges
    it (as a registrar system does): an attempt that fails while PostgreSQL is down is not
    an acceptance, and a retry of one that was stored must not record a second event."""
    postcode = rng.choice(POSTCODES)
    consents = {agency: rng.choice(["given", "refused", "none"]) for agency in consent_agencies()}
    key = str(uuid.uuid4())
    body = death_registration(
        deceased={
            # No NINO: without one, the same names, birth, death and postcode are the same death
            # (producers/duplicates.py), so each registration here is a person of its own.
            "given_names": f"Pat {key[:8]}",
            "family_name": rng.choice(["Example", "Sample", "Tester"]),
            "date_of_birth": "1941-03-02",
        },
        last_address={"lines": ["1 Example Street"], "town": "Somewhere", "postcode": postcode},
        consents=[{"agency": a, "choice": c} for a, c in consents.items() if c != "none"],
    )
    deadline = time.monotonic() + patience
    while True:
        try:
            response = await client.post(
                "/v1/death-registrations", json=body, headers={"Idempotency-Key": key}
            )
        except httpx.HTTPError as exc:
            load.refused_attempts[type(exc).__name__] += 1
        else:
            if response.status_code in (200, 201):
                if response.status_code == 200:
                    load.stored_before += 1
                answer = response.json()
                load.accepted.append(Accepted(answer["event_id"], answer["reference"], postcode, consents))
                return
            if response.status_code < 500 and response.status_code != 429:
                load.rejected.append(f"{response.status_code}: {response.text[:300]}")
                return
            load.refused_attempts[f"HTTP {response.status_code}"] += 1
        if time.monotonic() > deadline:
            load.given_up.append(key)
            return
        await asyncio.sleep(1.0)


async def steady_load(
    world: FaultWorld, rng: random.Random, load: Load, seconds: float, faults_over: asyncio.Event
) -> None:
    """Submit EVENTS_PER_SECOND registrations each second for ``seconds`` and until the
    last fault is over, each in its own task so that a slow or failing one does not slow
    the pace."""
    async with httpx.AsyncClient(
        base_url=world.base_url, timeout=10, headers={"Authorization": f"Bearer {world.token}"}
    ) as client:
        pending: list[asyncio.Task[None]] = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds or not faults_over.is_set():
            pending.append(asyncio.create_task(submit(client, rng, load, patience=90)))
            n += 1
            await asyncio.sleep(max(0.0, started + n / EVENTS_PER_SECOND - time.monotonic()))
        load.seconds = time.monotonic() - started
        await asyncio.gather(*pending)


# --- Faults ----------------------------------------------------------------------------


@dataclass
class Faults:
    seed: int
    done: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)


def fault_plan(rng: random.Random, seconds: float) -> list[tuple[float, str]]:
    """Each component's kills, one broker restart and one PostgreSQL restart, in a random
    order at random moments of the load (the first few seconds and the last few spared)."""
    kinds = [c for c in KILLED for _ in range(KILLS_EACH)] + ["kafka", "postgres"]
    rng.shuffle(kinds)
    moments = sorted(rng.uniform(5, seconds - 10) for _ in kinds)
    return list(zip(moments, kinds, strict=True))


async def inject(
    world: FaultWorld, rng: random.Random, faults: Faults, seconds: float, over: asyncio.Event
) -> None:
    """Carry out the plan; ``over`` is set once it is done (or has failed)."""
    try:
        started = time.monotonic()
        for moment, kind in fault_plan(rng, seconds):
            await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
            at = time.monotonic() - started
            if kind == "kafka":
                how = await asyncio.to_thread(world.restart_broker)
                faults.done["broker restart"] += 1
            elif kind == "postgres":
                how = await asyncio.to_thread(world.restart_postgres, rng.uniform(1, 4))
                faults.done["PostgreSQL restart"] += 1
            else:
                process = world.processes[kind]
                await process.kill()
                pause = rng.uniform(0.2, 3)
                await asyncio.sleep(pause)
                await process.start()
                faults.done[f"SIGKILL {kind}"] += 1
                how = f"down {pause:.1f}s"
            faults.timeline.append(f"{at:.1f}s {kind} ({how})")
    finally:
        over.set()


async def watch_processes(world: FaultWorld, until: asyncio.Event) -> None:
    """A component that exits without being asked to is noted and started again, as a
    process supervisor would (`tuo run` gives up if the broker or the database is down
    while it starts)."""
    while not until.is_set():
        for process in world.processes.values():
            exited = process.process
            # SIGKILLed by the fault injector, which starts it again itself.
            if exited is not None and exited.returncode not in (None, -signal.SIGKILL):
                process.exited_by_itself.append(exited.returncode)
                await asyncio.sleep(1)
                if process.process is exited:  # not started again meanwhile by the injector
                    await process.start()
        try:
            await asyncio.wait_for(until.wait(), timeout=0.5)
        except TimeoutError:
            pass


# --- What must hold afterwards ---------------------------------------------------------


async def final_receipts(pool: asyncpg.Pool, event_ids: list[str]) -> Counter[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT event_id::text, agency FROM delivery_receipt"
        " WHERE event_id = ANY($1::uuid[]) AND outcome = ANY($2::text[])",
        event_ids,
        list(FINAL_OUTCOMES),
    )
    return Counter((r["event_id"], r["agency"]) for r in rows)


async def drain(world: FaultWorld, expected: set[tuple[str, str]]) -> str:
    """Wait until every expected delivery has a final receipt, or the bus has stalled (the
    assertions then say which deliveries are missing, and how far each got); say which."""
    event_ids = sorted({e for e, _ in expected})
    started = progressed = time.monotonic()
    best = 0
    while time.monotonic() - progressed < STALLED_SECONDS and time.monotonic() - started < DRAIN_SECONDS:
        try:
            settled = len(set(await final_receipts(world.pool, event_ids)) & expected)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            settled = best  # the test's own connections, broken by the restart, are replaced
        if settled == len(expected):
            return f"all {settled} receipted"
        if settled > best:
            best, progressed = settled, time.monotonic()
        await asyncio.sleep(2)
    how = "stalled" if time.monotonic() - progressed >= STALLED_SECONDS else "gave up"
    return f"{how} at {best} of {len(expected)} receipted"


def log_lines(world: FaultWorld, event_id: str) -> list[str]:
    """Every component's log lines that name ``event_id`` (for a failure's evidence)."""
    lines = []
    for process in world.processes.values():
        for line in process.log.read_text(errors="replace").splitlines():
            if event_id in line:
                lines.append(f"[{process.component}] {line[:400]}")
    return lines


# Where each (event, agency) delivery sits on the agency's topic: (partition, offset) each time.
Positions = dict[tuple[str, str], list[tuple[int, int]]]


def warnings_of(world: FaultWorld, components: tuple[str, ...] = ("router", "relay")) -> list[str]:
    """Each distinct warning or error the router and the relay logged, with how often and
    when first: the failures around which a delivery can be lost or repeated."""
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for name in components:
        for line in world.processes[name].log.read_text(errors="replace").splitlines():
            if line.startswith(("WARNING:", "ERROR:")):  # aiokafka's own, through the logging module
                key = (name, line[:200])
                first, n = seen.get(key, ("", 0))
                seen[key] = (first, n + 1)
                continue
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:  # the last line of a process killed while writing it
                continue
            if entry.get("level") not in ("warning", "error", "critical"):
                continue
            raised = str(entry.get("exception", "")).strip().splitlines()[-1:]  # log.exception's last line
            what = (
                f"{entry.get('event')} {entry.get('error', '')} {entry.get('detail', '')} {' '.join(raised)}"
            )
            key = (name, what[:300])
            first, n = seen.get(key, (entry.get("timestamp", "?"), 0))
            seen[key] = (first, n + 1)
    return [f"[{name}] {n}x from {first}: {what}" for (name, what), (first, n) in seen.items()]


async def evidence(
    world: FaultWorld,
    pairs: list[tuple[str, str]],
    on_topics: dict[str, Counter[str]],
    positions: Positions | None = None,
) -> str:
    """What each store holds about these (event, agency) pairs; for deliveries on a topic
    more than once, where each copy is and how often the life event itself is on its topic."""
    out = []
    life_events: dict[str, list[tuple[int, int]]] = {}
    if positions is not None:
        records = await read_topic(world.settings, Topics(world.settings.topic_prefix).life_events)
        for r in records:
            life_events.setdefault(header(r, "ce_id") or "", []).append((r.partition, r.offset))
    for event_id, agency in pairs[:10]:
        decisions = await world.pool.fetch(
            "SELECT seq, outcome, decided_at FROM routing_decision WHERE event_id = $1 AND agency = $2",
            event_id,
            agency,
        )
        inbox = await world.pool.fetch(
            "SELECT outcome, reason, receipted_at FROM agency.inbox WHERE event_id = $1 AND agency = $2",
            event_id,
            agency,
        )
        receipts = await world.pool.fetch(
            "SELECT outcome, issued_at FROM delivery_receipt WHERE event_id = $1 AND agency = $2",
            event_id,
            agency,
        )
        outbox = await world.pool.fetchrow(
            "SELECT id, published_at, relay_batch FROM outbox WHERE event_id = $1", event_id
        )
        out.append(
            f"\n  {event_id} -> {agency}: outbox {dict(outbox) if outbox else None};"
            f" decisions {[dict(r) for r in decisions]}; on topic {on_topics[agency][event_id]}x;"
            f" inbox {[dict(r) for r in inbox]}; receipts {[dict(r) for r in receipts]}"
        )
        if positions is not None:
            out.append(
                f"\n    at (partition, offset) {positions.get((event_id, agency), [])} of the agency's topic;"
                f" the life event at {life_events.get(event_id, [])} of its topic"
            )
        out.extend(f"\n    {line}" for line in log_lines(world, event_id)[:20])
    if len(pairs) > 10:
        out.append(f"\n  … and {len(pairs) - 10} more")
    out.append("\n  warnings and errors of the router and the relay:")
    out.extend(f"\n    {line}" for line in warnings_of(world)[:40])
    if positions is not None:
        topics = Topics(world.settings.topic_prefix)
        kafka_home = world.stack.state_dir / "kafka"
        locations = [
            (topics.agency(agency), partition, offset)
            for event_id, agency in pairs[:3]
            for partition, offset in positions.get((event_id, agency), [])
        ] + [
            (topics.life_events, p, o) for event_id, _ in pairs[:1] for p, o in life_events.get(event_id, [])
        ]
        dump = await kafka_log_evidence(
            await asyncio.to_thread(ensure_tool_jars, CACHE_DIR, KAFKA_VERSION),
            kafka_home / "data",
            kafka_home / "logs" / "server.log",
            locations,
            mention=("TransactionCoordinator", "TransactionMarker", "router."),
        )
        out.append("\n  Kafka's log around them:\n    " + dump.replace("\n", "\n    "))
    return "".join(out)


@dataclass
class Checked:
    deliveries: int
    receipts: int
    chain_rows: int
    outcomes: Counter[str]
    repeats: int  # deliveries read again after a crash and answered from the inbox


async def assert_exactly_once_with_one_final_receipt(world: FaultWorld, accepted: list[Accepted]) -> Checked:
    topics = Topics(world.settings.topic_prefix)
    expected = {(a.event_id, agency) for a in accepted for agency in a.entitled}
    event_ids = sorted({a.event_id for a in accepted})

    # On each agency's topic (read_committed): each entitled event once, nothing else.
    on_topics: dict[str, Counter[str]] = {}
    positions: Positions = {}
    for agency in subscribed_agencies():
        records = await read_topic(world.settings, topics.agency(agency))
        on_topics[agency] = Counter(header(r, "ce_id") or "" for r in records)
        for r in records:
            positions.setdefault((header(r, "ce_id") or "", agency), []).append((r.partition, r.offset))
    delivered = {(event_id, agency) for agency, seen in on_topics.items() for event_id in seen}
    twice = sorted((e, a) for a, seen in on_topics.items() for e, n in seen.items() if n > 1)
    missing = sorted(expected - delivered)
    unentitled = sorted(delivered - expected)
    assert not missing, f"{len(missing)} entitled deliveries never reached the agency's topic:" + (
        await evidence(world, missing, on_topics)
    )
    assert not unentitled, f"{len(unentitled)} deliveries reached an agency without a basis:" + (
        await evidence(world, unentitled, on_topics)
    )
    assert not twice, f"{len(twice)} deliveries are on the agency's topic more than once:" + (
        await evidence(world, twice, on_topics, positions)
    )

    # In each agency's inbox: applied (or rejected) once, and only what it was entitled to.
    inbox = await world.pool.fetch("SELECT event_id::text, agency, outcome FROM agency.inbox")
    handled = Counter((r["event_id"], r["agency"]) for r in inbox)
    assert set(handled) == expected, (
        f"agencies' inboxes differ from the entitled deliveries: {len(expected - set(handled))} missing,"
        f" {len(set(handled) - expected)} without a basis:"
        + await evidence(world, sorted(expected ^ set(handled)), on_topics)
    )
    assert max(handled.values()) == 1

    # Routing decisions: DELIVERED for exactly the entitled pairs, once each.
    decisions = await world.pool.fetch(
        "SELECT event_id::text, agency FROM routing_decision WHERE outcome = 'DELIVERED'"
    )
    decided = Counter((r["event_id"], r["agency"]) for r in decisions)
    assert set(decided) == expected, "DELIVERED decisions differ from the entitled deliveries:" + (
        await evidence(world, sorted(expected ^ set(decided)), on_topics)
    )
    assert max(decided.values()) == 1

    # Receipts: exactly one final receipt (APPLIED or REJECTED) per delivery, none otherwise.
    receipts = await final_receipts(world.pool, event_ids)
    wrong = sorted(pair for pair in expected | set(receipts) if receipts[pair] != (pair in expected))
    assert not wrong, f"{len(wrong)} deliveries have no final receipt or more than one:" + (
        await evidence(world, wrong, on_topics)
    )

    async with world.pool.acquire() as conn:
        chain_rows, findings = await audit.verify(conn)
    assert not findings, f"the audit chain does not verify: {findings[:10]}"
    assert chain_rows == await world.pool.fetchval("SELECT count(*) FROM routing_decision")
    outcomes = Counter(r["outcome"] for r in inbox)
    return Checked(len(delivered), sum(receipts.values()), chain_rows, outcomes, handled_again(world))


def handled_again(world: FaultWorld) -> int:
    """How often an agency consumer handled a delivery it had handled before (the inbox
    answered it without applying it again), from the agencies' logs."""
    handled: Counter[tuple[str, str]] = Counter()
    for line in world.processes["agencies"].log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "event_handled":
                handled[(entry["event_id"], entry["agency"])] += 1
    return sum(n - 1 for n in handled.values())


# --- The suite -------------------------------------------------------------------------


async def test_every_accepted_event_reaches_each_entitled_agency_once_through_crashes_and_restarts(
    world: FaultWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    set_up = time.monotonic()
    seed = int(os.environ.get("TUO_FAULT_SEED", random.randrange(10**9)))
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\nFault suite: seed {seed} (replay the plan with TUO_FAULT_SEED={seed})")
    env = world.service_env()
    for component in ("intake", *KILLED):
        world.processes[component] = BusProcess(component, env, world.home / f"{component}.log")
        await world.processes[component].start()

    async def intake_up() -> bool:
        assert world.processes["intake"].running, f"intake exited; see {world.processes['intake'].log}"
        try:
            async with httpx.AsyncClient(base_url=world.base_url, timeout=2) as client:
                return (await client.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(intake_up, timeout=60, what="intake to listen")
    started = time.monotonic()

    load, faults, faults_over = Load(), Faults(seed), asyncio.Event()
    # The supervisor watches until the bus has drained: a component that exits by itself
    # after the last fault (a broker restart near the end) is started again, as in production.
    drained = asyncio.Event()
    watching = asyncio.create_task(watch_processes(world, drained))
    try:
        await asyncio.gather(
            steady_load(world, random.Random(rng.random()), load, LOAD_SECONDS, faults_over),
            inject(world, random.Random(rng.random()), faults, LOAD_SECONDS, faults_over),
        )
        load_seconds = time.monotonic() - started
        assert not load.rejected, f"intake refused {len(load.rejected)} registrations: {load.rejected[:3]}"
        assert not load.given_up, f"intake never acknowledged {len(load.given_up)} registrations"
        assert len({a.event_id for a in load.accepted}) == len(load.accepted)

        expected = {(a.event_id, agency) for a in load.accepted for agency in a.entitled}
        drain_started = time.monotonic()
        drained_how = await drain(world, expected)
        drain_seconds = time.monotonic() - drain_started
    finally:
        drained.set()
        await watching
    exits = {name: await process.stop() for name, process in world.processes.items()}
    checks_started = time.monotonic()
    try:
        checked = await assert_exactly_once_with_one_final_receipt(world, load.accepted)
    except AssertionError as failed:
        # What a reader of a CI log needs to reproduce and explain it: the seed, the faults'
        # timeline, and how each component's log ended.
        tails = "".join(
            f"\n  [{name}] last lines:\n    "
            + "\n    ".join(p.log.read_text(errors="replace").splitlines()[-25:])[:6000]
            for name, p in world.processes.items()
        )
        # CI keeps only the end of its output, so the verdict comes last: what failed (with the
        # first pairs' evidence), the seed and the timeline, after the full evidence and the tails.
        verdict = "\n".join(line[:700] for line in str(failed).splitlines()[:4])
        raise AssertionError(
            f"{failed}{tails}\n\nFault suite failed: {verdict}\nseed {seed}; timeline:"
            f" {'; '.join(faults.timeline)}; load {load_seconds:.0f}s,"
            f" drain {drain_seconds:.0f}s ({drained_how})"
        ) from None

    crashed = {n: p.exited_by_itself for n, p in world.processes.items() if p.exited_by_itself}
    with capsys.disabled():
        print(
            f"\nFault suite passed (seed {seed}):"
            f"\n  faults injected: {sum(faults.done.values())}"
            f" ({', '.join(f'{kind} x{n}' for kind, n in sorted(faults.done.items()))})"
            f"\n  timeline: {'; '.join(faults.timeline)}"
            f"\n  events accepted: {len(load.accepted)} submitted over {load.seconds:.0f}s"
            f"; failed attempts retried with the same Idempotency-Key:"
            f" {sum(load.refused_attempts.values())} {dict(load.refused_attempts)},"
            f" ({load.stored_before} registrations found already stored on a retry)"
            f"\n  deliveries checked: {checked.deliveries} (each on its agency's topic once, in its"
            f" inbox once; none without a basis); inbox outcomes {dict(checked.outcomes)};"
            f" handled again after a crash and answered from the inbox: {checked.repeats}"
            f"\n  final receipts checked: {checked.receipts} (exactly one per delivery)"
            f"\n  audit chain rows verified: {checked.chain_rows}"
            f"\n  components that exited by themselves (restarted): {crashed or 'none'};"
            f" exit codes at the end: {exits}"
            f"\n  components' start {started - set_up:.0f}s, load+faults {load_seconds:.0f}s,"
            f" drain {drain_seconds:.0f}s, checks {time.monotonic() - checks_started:.0f}s"
        )
    assert sum(faults.done.values()) == len(KILLED) * KILLS_EACH + 2
