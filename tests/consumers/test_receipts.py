"""Delivery receipts through the real broker and database: effectively-once
handling across a crash, redelivery answered as a duplicate, poison events,
slow handlers, overdue receipts and redelivery of what is overdue.

Each test subscribes its own test agency to deaths in one postcode district,
so only the deaths it registers there reach that agency.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import string
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from consumers import sdk
from consumers.sdk import AgencyConsumer, DeliveredEvent, Handler
from producers.accounts import issue_token
from router.store import record_consent, upsert_subscription
from runtime import kafka
from runtime.access import Principal, agency_principal, onboard_agency
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode, models
from tests.support import (
    death_registration,
    eventually,
    header,
    inspector_producer,
    kafka_env,
    known_to_every_agency,
    random_nino,
    read_topic,
    today,
    tuo_cli,
)

pytestmark = pytest.mark.integration
PROJECT = Path(__file__).resolve().parents[2]


async def _subscribe(settings: Settings, pool: asyncpg.Pool, agency: str, district: str) -> None:
    """A statutory subscription for deaths in one postcode district, and its topics."""
    await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="statutory",
        statute="Test Notifications Act 2026 s.1",
        fields=["deceased", "date_of_death", "last_address"],
        condition={"postcode_areas": [district]},
    )
    await onboard_agency(settings, pool, agency, [], by="tests", reinstate=True)


@pytest.fixture(scope="module")
async def monitoring_token(pool: asyncpg.Pool) -> str:
    """What a Prometheus server scrapes /metrics with."""
    return await issue_token(pool, "leeds", "monitoring", "receipts test monitoring")


async def _metrics(intake: httpx.AsyncClient, monitoring_token: str) -> str:
    response = await intake.get("/metrics", headers={"Authorization": f"Bearer {monitoring_token}"})
    assert response.status_code == 200, response.text
    return response.text


async def _register(intake: httpx.AsyncClient, postcode: str, family_name: str = "Example") -> dict[str, Any]:
    body = death_registration(
        deceased={
            "given_names": "Pat",
            "family_name": family_name,
            "date_of_birth": "1941-03-02",
            "nino": random_nino(),
        },
        last_address={"lines": ["1 Harbour Street"], "town": "Lerwick", "postcode": postcode},
    )
    response = await intake.post("/v1/death-registrations", json=body)
    assert response.status_code == 201, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def _effects_table(pool: asyncpg.Pool, name: str) -> Callable[[str], Awaitable[int]]:
    await pool.execute(f"CREATE TABLE IF NOT EXISTS {name} (event_id uuid NOT NULL)")

    async def count(event_id: str) -> int:
        n: int = await pool.fetchval(f"SELECT count(*) FROM {name} WHERE event_id = $1", uuid.UUID(event_id))
        return n

    return count


def _recording(table: str) -> Handler:
    async def apply(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await conn.execute(f"INSERT INTO {table} (event_id) VALUES ($1)", uuid.UUID(event.event_id))

    return apply


def _choking_on_poison(table: str) -> Handler:
    """Records each event, but fails (as a bug would) on every event about a Poison."""
    record = _recording(table)

    async def choke_on_poison(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        if event.record["deceased"]["family_name"] == "Poison":
            raise ValueError("cannot parse the record for Pat Poison")
        await record(event, conn)

    return choke_on_poison


async def _stored_receipts(pool: asyncpg.Pool, agency: str, event_id: str) -> dict[str, str | None]:
    rows = await pool.fetch(
        "SELECT outcome, reason FROM delivery_receipt WHERE agency = $1 AND event_id = $2",
        agency,
        uuid.UUID(event_id),
    )
    return {r["outcome"]: r["reason"] for r in rows}


async def _final_receipt(pool: asyncpg.Pool, agency: str, event_id: str, timeout: float = 60) -> str:
    async def final() -> str | None:
        stored = await _stored_receipts(pool, agency, event_id)
        return next((o for o in ("APPLIED", "REJECTED") if o in stored), None)

    outcome: str = await eventually(final, timeout=timeout, what=f"a final receipt from {agency}")
    return outcome


async def _receipts_on_topic(settings: Settings, agency: str, event_id: str) -> list[dict[str, Any]]:
    """The receipts the agency sent for the event, in the order it sent them."""
    records = await read_topic(settings, Topics(settings.topic_prefix).receipts(agency))
    bodies = [decode(r.value or b"")[1] for r in records]
    return [b for b in bodies if str(b["event_id"]) == event_id]


async def _on_agency_topic(settings: Settings, agency: str, event_ids: list[str]) -> list[int]:
    """Offsets of the events on the agency's topic, once all are there."""

    async def offsets() -> list[int] | None:
        records = await read_topic(settings, Topics(settings.topic_prefix).agency(agency))
        found = {header(r, "ce_id"): r.offset for r in records}
        return [found[e] for e in event_ids] if all(e in found for e in event_ids) else None

    found: list[int] = await eventually(offsets, timeout=60, what=f"the events on {agency}'s topic")
    return found


async def _copies_on_agency_topic(
    settings: Settings, agency: str, event_id: str, expected: int
) -> list[ConsumerRecord[bytes, bytes]]:
    """The copies of one event on the agency's topic, once there are ``expected`` of them
    (and checked to be exactly that many)."""

    async def copies() -> list[ConsumerRecord[bytes, bytes]] | None:
        records = await read_topic(settings, Topics(settings.topic_prefix).agency(agency))
        found = [r for r in records if header(r, "ce_id") == event_id]
        return found if len(found) >= expected else None

    found: list[ConsumerRecord[bytes, bytes]] = await eventually(
        copies, what=f"{expected} copies at {agency}"
    )
    assert len(found) == expected, f"{agency} has {len(found)} copies"
    return found


@pytest.fixture
async def agency_consumers(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Callable[..., None]]:
    """Start in-process agency consumers; all are stopped when the test ends."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(agency: str, handler: Handler, **options: Any) -> None:
        tasks.append(
            asyncio.create_task(AgencyConsumer(services, pool, agency, handler, **options).run(stop))
        )

    yield start
    stop.set()
    await asyncio.gather(*tasks)


def _component_env(settings: Settings, home: Path) -> dict[str, str]:
    assert settings.database_url is not None
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("TUO_")},
        **kafka_env(settings),
        "TUO_DATABASE_URL": settings.database_url.get_secret_value(),
        "TUO_TOPIC_PREFIX": settings.topic_prefix,
        "TUO_STATE_DIR": str(home / "no-stack"),
    }


async def test_consumer_killed_between_applying_and_receipting_applies_once_and_sends_one_applied_receipt(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient, tmp_path: Path
) -> None:
    await _subscribe(services, pool, "t-crash", "ZE1")
    effects = await _effects_table(pool, "crash_effect")
    accepted = await _register(intake, "ZE1 0AA")
    event_id = accepted["event_id"]
    await _on_agency_topic(services, "t-crash", [event_id])

    async def agency_process(*flags: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.tools.crashing_agency",
            "t-crash",
            *flags,
            cwd=PROJECT,
            env=_component_env(services, tmp_path),
            stdout=(tmp_path / "agency.log").open("ab"),
            stderr=asyncio.subprocess.STDOUT,
        )

    crashing = await agency_process("--crash")
    assert await asyncio.wait_for(crashing.wait(), timeout=60) == -signal.SIGKILL
    # Killed with the effect committed and no receipt sent anywhere.
    assert await effects(event_id) == 1
    assert await _receipts_on_topic(services, "t-crash", event_id) == []
    inbox = await pool.fetchrow(
        "SELECT outcome, receipted_at FROM agency.inbox WHERE agency = 't-crash' AND event_id = $1",
        uuid.UUID(event_id),
    )
    assert (inbox["outcome"], inbox["receipted_at"]) == ("APPLIED", None)

    restarted = await agency_process()
    try:
        assert await _final_receipt(pool, "t-crash", event_id) == "APPLIED"
    finally:
        restarted.terminate()
        await asyncio.wait_for(restarted.wait(), timeout=30)
    assert await effects(event_id) == 1, "the restarted consumer must not apply the event again"
    sent = await _receipts_on_topic(services, "t-crash", event_id)
    assert [(r["outcome"], r["duplicate"]) for r in sent] == [("APPLIED", False)]
    assert await _stored_receipts(pool, "t-crash", event_id) == {"APPLIED": None}


async def test_redelivered_event_is_applied_once_and_receipted_as_a_duplicate(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency_consumers: Callable[..., None],
) -> None:
    await _subscribe(services, pool, "t-replay", "ZE2")
    effects = await _effects_table(pool, "replay_effect")
    agency_consumers("t-replay", _recording("replay_effect"))
    accepted = await _register(intake, "ZE2 9AA")
    event_id = accepted["event_id"]
    assert await _final_receipt(pool, "t-replay", event_id) == "APPLIED"

    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        "receipts",
        "redeliver",
        "t-replay",
        "--reference",
        accepted["reference"],
        "--reason",
        "agency restored last night's backup",
        "--by",
        "operator.one",
    )
    assert code == 0, output
    assert "Queued 1 event(s) for redelivery to t-replay" in output

    async def duplicate_stored() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await pool.fetchrow(
            "SELECT outcome FROM receipt_duplicate WHERE agency = 't-replay' AND event_id = $1",
            uuid.UUID(event_id),
        )
        return row

    assert (await eventually(duplicate_stored, what="the duplicate receipt"))["outcome"] == "APPLIED"
    assert await effects(event_id) == 1
    await _copies_on_agency_topic(services, "t-replay", event_id, 2)
    for other in ("hmrc", "dwp"):  # entitled to this death too, but not named in the redelivery
        await _copies_on_agency_topic(services, other, event_id, 1)
    sent = await _receipts_on_topic(services, "t-replay", event_id)
    assert [(r["outcome"], r["duplicate"]) for r in sent] == [("APPLIED", False), ("APPLIED", True)]
    redelivery = await pool.fetchrow(
        "SELECT requested_by, reason FROM redelivery WHERE event_id = $1", uuid.UUID(event_id)
    )
    assert dict(redelivery) == {
        "requested_by": "operator.one",
        "reason": "agency restored last night's backup",
    }
    code, output = await asyncio.to_thread(
        tuo_cli, services, "status", accepted["reference"], "--reason", "checking a test event"
    )
    assert code == 0, output
    line = next(line for line in output.splitlines() if "t-replay" in line)
    assert "applied" in line and "[1 redelivered, 1 duplicate]" in line


async def test_redelivery_is_refused_for_an_agency_the_event_never_went_to(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    accepted = await _register(intake, "ZE2 9AB")

    async def decided() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT 1 FROM routing_decision WHERE event_id = $1", uuid.UUID(accepted["event_id"])
            )
        )

    await eventually(decided, what="the routing decisions")
    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        "receipts",
        "redeliver",
        "council-bradford",
        "-r",
        accepted["reference"],
        "--reason",
        "test",
    )
    assert code == 1
    assert "never delivered to council-bradford" in output
    code, output = await asyncio.to_thread(
        tuo_cli, services, "receipts", "redeliver", "hmrc", "-r", accepted["reference"], "--reason", "x"
    )
    assert code == 1 and "reason of 3 to 500 characters" in output
    code, output = await asyncio.to_thread(
        tuo_cli, services, "receipts", "redeliver", "hmrc", "-r", "TUO-0000-NOPE-NOPE", "--reason", "typo"
    )
    assert code == 1 and "no event has reference TUO-0000-NOPE-NOPE" in output
    assert not await pool.fetchval(
        "SELECT count(*) FROM redelivery WHERE event_id = $1", uuid.UUID(accepted["event_id"])
    )


async def test_poison_event_is_rejected_with_its_reason_and_dead_lettered_and_later_events_still_apply(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency_consumers: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sdk, "HANDLER_BACKOFF_SECONDS", 0.01)
    await _subscribe(services, pool, "t-poison", "ZE3")
    effects = await _effects_table(pool, "poison_effect")
    choke_on_poison = _choking_on_poison("poison_effect")

    # One at a time, so they reach the agency's one partition in this order (different
    # people may take different paths through the life-events partitions).
    before = (await _register(intake, "ZE3 9JA"))["event_id"]
    await _on_agency_topic(services, "t-poison", [before])
    poison = (await _register(intake, "ZE3 9JA", family_name="Poison"))["event_id"]
    await _on_agency_topic(services, "t-poison", [poison])
    after = (await _register(intake, "ZE3 9JA"))["event_id"]
    offsets = await _on_agency_topic(services, "t-poison", [before, poison, after])
    assert offsets == sorted(offsets), "all three on the agency's one partition, in this order"
    agency_consumers("t-poison", choke_on_poison)

    assert await _final_receipt(pool, "t-poison", poison) == "REJECTED"
    assert (await _stored_receipts(pool, "t-poison", poison))[
        "REJECTED"
    ] == "handler failed 3 times: ValueError"
    assert await _final_receipt(pool, "t-poison", after) == "APPLIED"
    assert await _final_receipt(pool, "t-poison", before) == "APPLIED"
    assert [await effects(e) for e in (before, poison, after)] == [1, 0, 1]
    letters = [
        r
        for r in await read_topic(services, Topics(services.topic_prefix).agency_dead_letters("t-poison"))
        if header(r, "ce_id") == poison and header(r, "tuo_dlq_component") == "agency:t-poison"
    ]
    assert len(letters) == 1
    assert header(letters[0], "tuo_dlq_reason") == "handler failed 3 times: ValueError"


async def test_a_batch_with_a_poison_event_and_a_duplicate_applies_the_good_event_once_and_commits_past_all(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency_consumers: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sdk, "HANDLER_BACKOFF_SECONDS", 0.01)
    await _subscribe(services, pool, "t-batch", "ZE5")
    topic = Topics(services.topic_prefix).agency("t-batch")
    effects = await _effects_table(pool, "batch_effect")
    choke_on_poison = _choking_on_poison("batch_effect")

    good = (await _register(intake, "ZE5 9JA"))["event_id"]
    poison = (await _register(intake, "ZE5 9JA", family_name="Poison"))["event_id"]
    await _on_agency_topic(services, "t-batch", [good, poison])
    # The good event delivered again behind both (as a redelivery would put it there).
    [copy] = await _copies_on_agency_topic(services, "t-batch", good, 1)
    producer = inspector_producer(services)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=copy.value, key=copy.key, headers=list(copy.headers))
    finally:
        await producer.stop()
    end: int = max(r.offset for r in await read_topic(services, topic)) + 1

    with capture_logs() as logs:  # all three are on the topic before the consumer starts
        agency_consumers("t-batch", choke_on_poison)
        assert await _final_receipt(pool, "t-batch", poison) == "REJECTED"
        assert await _final_receipt(pool, "t-batch", good) == "APPLIED"

        async def committed_past_all() -> bool:
            return await _committed(services, f"{services.topic_prefix}.agency.t-batch", topic) >= end

        await eventually(committed_past_all, what="the group's offset past all three messages")
    handled = [e for e in logs if e["event"] == "batch_handled" and e["agency"] == "t-batch"]
    assert handled[0]["messages"] == 3, f"one batch of the three messages, not {handled}"
    assert (handled[0]["events"], handled[0]["duplicates"], handled[0]["dead_lettered"]) == (2, 1, 1)

    assert [await effects(good), await effects(poison)] == [1, 0]
    sent = await _receipts_on_topic(services, "t-batch", good)
    assert [(r["outcome"], r["duplicate"]) for r in sent] == [("APPLIED", False), ("APPLIED", True)]
    assert [(r["outcome"], r["reason"]) for r in await _receipts_on_topic(services, "t-batch", poison)] == [
        ("REJECTED", "handler failed 3 times: ValueError")
    ]
    letters = [
        r
        for r in await read_topic(services, Topics(services.topic_prefix).agency_dead_letters("t-batch"))
        if header(r, "ce_id") in (good, poison)
    ]
    assert [header(r, "ce_id") for r in letters] == [poison]

    async def duplicate_stored() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT 1 FROM receipt_duplicate WHERE agency = 't-batch' AND event_id = $1", uuid.UUID(good)
            )
        )

    await eventually(duplicate_stored, what="the duplicate's receipt stored by the tracker")


async def _committed(settings: Settings, group: str, topic: str) -> int:
    client = kafka.admin(settings, principal=Principal.OPERATOR)
    await client.start()
    try:
        offsets = await client.list_consumer_group_offsets(group)
    finally:
        await client.close()
    committed: int = sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)
    return committed


async def test_slow_handler_gets_a_received_receipt_and_keeps_its_place_in_the_group(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency_consumers: Callable[..., None],
) -> None:
    await _subscribe(services, pool, "t-slow", "HS2")
    calls: list[str] = []

    async def slow(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        calls.append(event.event_id)
        await asyncio.sleep(8)  # far past the consumer's 3-second max_poll_interval

    agency_consumers(
        "t-slow", slow, max_poll_interval_ms=3000, session_timeout_ms=6000, heartbeat_interval_ms=1000
    )
    group = f"{services.topic_prefix}.agency.t-slow"

    async def one_member() -> list[str] | None:
        try:
            members = await _group_members(services, group)
        except KafkaError:  # the group's coordinator is still loading on a fresh broker
            return None
        return members if len(members) == 1 else None

    member = await eventually(one_member, what="the consumer in its group")
    accepted = await _register(intake, "HS2 9AA")
    event_id = accepted["event_id"]
    assert await _final_receipt(pool, "t-slow", event_id) == "APPLIED"
    sent = await _receipts_on_topic(services, "t-slow", event_id)
    assert [(r["outcome"], r["duplicate"]) for r in sent] == [("RECEIVED", False), ("APPLIED", False)]
    assert sent[0]["received_at"] == sent[1]["received_at"]
    assert calls == [event_id]
    # A consumer that stops polling for longer than max_poll_interval leaves its group and
    # rejoins under a new member id (its partitions meanwhile go to another consumer).
    assert await _group_members(services, group) == member


async def _group_members(settings: Settings, group: str) -> list[str]:
    client = kafka.admin(settings, principal=Principal.OPERATOR)
    await client.start()
    try:
        [response] = await client.describe_consumer_groups([group])
    finally:
        await client.close()
    [described] = response.groups
    state, members = described[2], described[5]
    return [m[0] for m in members] if state == "Stable" else []


async def test_agency_that_never_answers_is_flagged_overdue_after_its_deadline_and_can_be_redelivered(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    agency_consumers: Callable[..., None],
    monitoring_token: str,
) -> None:
    await _subscribe(services, pool, "t-silent", "HS1")
    code, output = await asyncio.to_thread(tuo_cli, services, "receipts", "deadline", "t-silent", "0.05")
    assert code == 0 and "t-silent must answer within 0:00:03" in output, output
    accepted = await _register(intake, "HS1 2AA")

    async def status() -> dict[str, Any]:
        found: dict[str, Any] = (await intake.get(f"/v1/events/{accepted['reference']}")).json()
        return next((a for a in found.get("agencies", []) if a["agency"] == "t-silent"), {})

    async def overdue() -> dict[str, Any] | None:
        row = await status()
        return row if row.get("overdue") else None

    flagged = await eventually(overdue, timeout=30, what="t-silent flagged overdue")
    assert flagged["receipt"] is None and flagged["received_at"] is None
    assert flagged["delivered_at"] is not None
    due = await pool.fetchrow(
        "SELECT due_at - delivered_at AS deadline FROM receipt_overdue"
        " WHERE agency = 't-silent' AND event_id = $1",
        uuid.UUID(accepted["event_id"]),
    )
    assert due["deadline"].total_seconds() == 3

    metrics = await _metrics(intake, monitoring_token)
    assert 'tuo_receipts_overdue{agency="t-silent"} 1.0' in metrics
    assert 'tuo_receipts_overdue_flagged_total{agency="t-silent"} 1.0' in metrics
    code, output = await asyncio.to_thread(tuo_cli, services, "receipts", "overdue", "--agency", "t-silent")
    assert code == 0 and accepted["reference"] in output and "1 overdue" in output
    code, output = await asyncio.to_thread(
        tuo_cli, services, "status", accepted["reference"], "--reason", "checking a test event"
    )
    assert "OVERDUE" in next(line for line in output.splitlines() if "t-silent" in line)

    # The agency comes back; its overdue deliveries are sent again (and answered once).
    await pool.execute("CREATE TABLE IF NOT EXISTS silent_effect (event_id uuid NOT NULL)")
    code, output = await asyncio.to_thread(
        tuo_cli, services, "receipts", "redeliver", "t-silent", "--overdue", "--reason", "agency back online"
    )
    assert code == 0 and "Queued 1 event(s)" in output, output
    copies = await _copies_on_agency_topic(services, "t-silent", accepted["event_id"], 2)
    assert all(not any(k.startswith("tuo_redeliver") for k, _ in c.headers) for c in copies), (
        "the operator's headers stay with the router"
    )
    agency_consumers("t-silent", _recording("silent_effect"))
    assert await _final_receipt(pool, "t-silent", accepted["event_id"]) == "APPLIED"

    async def cleared() -> dict[str, Any] | None:
        row = await status()
        return row if not row.get("overdue") and row.get("receipt") else None

    settled = await eventually(cleared, what="the overdue flag cleared by the late receipt")
    assert settled["receipt"]["outcome"] == "applied" and settled["received_at"] is not None
    assert settled["redeliveries"] == 1
    metrics = await _metrics(intake, monitoring_token)
    assert 'tuo_receipts_overdue{agency="t-silent"} 0.0' in metrics
    assert 'tuo_receipts_overdue_flagged_total{agency="t-silent"} 1.0' in metrics
    assert 'tuo_receipts_total{agency="t-silent",outcome="applied"} 1.0' in metrics


async def test_a_death_registered_at_intake_is_applied_by_every_entitled_agency_and_tuo_status_shows_it(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    nino = random_nino()
    family_name = "Receipt" + "".join(random.choices(string.ascii_lowercase, k=8))
    person = models.Person(given_names="Jean", family_name=family_name, date_of_birth=date(1939, 4, 5))
    partner = models.Person(given_names="Lou", family_name=family_name, date_of_birth=date(1940, 6, 7))
    home = models.Address(lines=["7 Receipt Row"], town="Leeds", postcode="LS6 2QQ")
    died_on = today() - timedelta(days=4)
    await known_to_every_agency(pool, nino, person, partner, home)
    body = death_registration(
        deceased={
            "given_names": "Jean",
            "family_name": family_name,
            "date_of_birth": "1939-04-05",
            "nino": nino,
        },
        date_of_death=died_on.isoformat(),
        last_address={"lines": ["7 Receipt Row"], "town": "Leeds", "postcode": "LS6 2QQ"},
    )
    accepted = (await intake.post("/v1/death-registrations", json=body)).json()
    event_id = accepted["event_id"]
    entitled = ("council-leeds", "dvla", "dwp", "hmrc")  # dvla by the informant's consent
    for agency in entitled:
        assert await _final_receipt(pool, agency, event_id) == "APPLIED", agency

    code, output = await asyncio.to_thread(
        tuo_cli, services, "status", accepted["reference"], "--reason", "checking a test event"
    )
    assert code == 0, output
    rows = {line.split()[1]: line for line in output.splitlines() if line.startswith("│")}
    for agency in entitled:
        assert "delivered" in rows[agency] and "applied" in rows[agency], rows[agency]
        assert rows[agency].count(str(today().year)) >= 2, "delivered at and received at are shown"
    assert "withheld: no consent" in rows["hmpo"]

    # And each agency's own records show the effect.
    tax = await pool.fetchrow("SELECT status, closed_on FROM agency.tax_record WHERE nino = $1", nino)
    assert (tax["status"], tax["closed_on"]) == ("closed", died_on)
    award = await pool.fetchrow(
        "SELECT status, overpayment_pence FROM agency.pension_award WHERE nino = $1", nino
    )
    assert (award["status"], award["overpayment_pence"]) == ("stopped", 21_000 * 4 // 7)
    licence = await pool.fetchval(
        "SELECT status FROM agency.driving_licence WHERE family_name = $1", family_name
    )
    assert licence == "cancelled"
    discount = await pool.fetchval(
        "SELECT single_person_discount FROM agency.council_household"
        " WHERE council = 'council-leeds' AND postcode = 'LS6 2QQ' AND address_lines[1] = '7 Receipt Row'"
    )
    assert discount is True, "the surviving partner now lives alone"


async def test_redelivery_after_consent_is_withdrawn_sends_nothing(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    accepted = await _register(intake, "ZE2 9AD")  # dvla told, by the informant's consent
    event_id = accepted["event_id"]
    await _copies_on_agency_topic(services, "dvla", event_id, 1)
    subject_id = await pool.fetchval(
        "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(event_id)
    )
    await record_consent(
        pool,
        subject_id=subject_id,
        agency="dvla",
        event_type="DeathRegistered",
        choice="withdrawn",
        recorded_by="citizen",
    )
    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        "receipts",
        "redeliver",
        "dvla",
        "-r",
        accepted["reference"],
        "--reason",
        "test withdrawal",
    )
    assert code == 0 and "Queued 1 event(s)" in output, output
    # Wait until the router has read past the redelivery, then check nothing went out.
    redelivery_id = await pool.fetchval(
        "SELECT max(id) FROM redelivery WHERE event_id = $1 AND agency = 'dvla'", uuid.UUID(event_id)
    )
    topics = Topics(services.topic_prefix)

    async def redelivery_on_topic() -> ConsumerRecord[bytes, bytes] | None:
        records = await read_topic(services, topics.redeliveries)
        return next((r for r in records if header(r, "tuo_redelivery_id") == str(redelivery_id)), None)

    request = await eventually(redelivery_on_topic, what="the redelivery request on its topic")

    async def router_past_it() -> bool:
        client = kafka.admin(services, principal=Principal.OPERATOR)
        await client.start()
        try:
            committed = await client.list_consumer_group_offsets(f"{services.topic_prefix}.router")
        finally:
            await client.close()
        offset: int = next(
            (
                m.offset
                for tp, m in committed.items()
                if (tp.topic, tp.partition) == (request.topic, request.partition)
            ),
            -1,
        )
        return bool(offset > request.offset)

    await eventually(router_past_it, what="the router to pass the redelivery")
    await _copies_on_agency_topic(services, "dvla", event_id, 1)


async def test_a_receipt_the_database_would_choke_on_is_cleaned_and_the_tracker_keeps_going(
    services: Settings, pool: asyncpg.Pool, bus: Any
) -> None:
    from schemas import encode
    from schemas.cloudevents import headers_for

    topic = Topics(services.topic_prefix).receipts("hmrc")
    hostile, after = str(uuid.uuid4()), str(uuid.uuid4())
    # A hostile agency may write only its own receipt topic: hmrc's own credentials.
    producer = kafka.producer(services, principal=agency_principal("hmrc"), client_id="hostile-hmrc")
    await producer.start()
    try:
        for event_id, reason in ((hostile, "bad\x00byte " + "x" * 5000), (after, None)):
            value = encode(
                "DeliveryReceipt",
                models.DeliveryReceipt(
                    event_id=event_id,
                    agency="hmrc",
                    outcome="REJECTED" if reason else "APPLIED",
                    reason=reason,
                    issued_at=datetime.now(UTC),
                ).avro(),
            )
            headers = headers_for(
                value,
                id=f"{event_id}/hmrc",
                source="/agencies/hmrc",
                subject=None,
                time=datetime.now(UTC),
                schema_base_url="http://127.0.0.1:8080",
            )
            await producer.send_and_wait(topic, value=value, headers=headers)
    finally:
        await producer.stop()
    assert await _final_receipt(pool, "hmrc", after) == "APPLIED"
    stored = (await _stored_receipts(pool, "hmrc", hostile))["REJECTED"]
    assert stored is not None and "\x00" not in stored and len(stored) == 500
    assert stored.startswith("bad byte x")


async def test_receipt_deadlines_are_refused_for_unknown_agencies_and_beyond_thirty_days(
    services: Settings, pool: asyncpg.Pool
) -> None:
    code, output = await asyncio.to_thread(tuo_cli, services, "receipts", "deadline", "no-such-agency", "5")
    assert code == 1 and "no agency 'no-such-agency' has a subscription" in output
    code, output = await asyncio.to_thread(tuo_cli, services, "receipts", "deadline", "hmrc", "1e12")
    assert code == 2 and "43200" in output
    code, output = await asyncio.to_thread(tuo_cli, services, "receipts", "deadline", "hmrc", "-1")
    assert code == 2
    assert not await pool.fetchval("SELECT count(*) FROM agency_receipt_deadline WHERE agency = 'hmrc'")
