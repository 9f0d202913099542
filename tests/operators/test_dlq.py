"""`tuo dlq list | show | redrive`: dead letters with reason, origin and age, and a
redrive that sends the stored original through the normal path once the cause is
fixed, recorded with who and why. Hostile dead letters, ids and reasons are
refused with a clear error and nothing is written or lost."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from operators import dead_letters as dlq
from operators.services import RunningBus
from producers.accept import new_reference
from producers.accounts import ensure_office
from producers.office_keys import SigningKey
from producers.store import NewEvent, record_event
from runtime.kafka import Topics
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.cloudevents import CloudEvent
from tests.support import (
    death_message,
    death_registration,
    eventually,
    header,
    inspector_producer,
    read_topic,
    tuo_cli,
)

pytestmark = pytest.mark.integration


async def _tuo(settings: Settings, *args: str) -> tuple[int, str]:
    """`tuo …` in-process, off the event loop (the command runs its own)."""
    return await asyncio.to_thread(tuo_cli, settings, *args)


STATUTORY = ("hmrc", "dwp", "council-leeds")  # a death at a Leeds address, whatever the consent


async def _written(pool: asyncpg.Pool) -> tuple[int, int, int]:
    """What a redrive writes: outbox rows, redrive records, redeliveries."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM outbox) AS outbox,"
        " (SELECT count(*) FROM dead_letter_redrive) AS redrives,"
        " (SELECT count(*) FROM redelivery) AS redeliveries"
    )
    return row["outbox"], row["redrives"], row["redeliveries"]


async def _letter_for(
    settings: Settings, pool: asyncpg.Pool, event_id: str, source: str
) -> dlq.StoredDeadLetter:
    async def found() -> dlq.StoredDeadLetter | None:
        letters = await dlq.list_dead_letters(settings, pool, agency=source, limit=None)
        return next((d for d in letters if str(d.event_id) == event_id), None)

    return await eventually(found, timeout=60, what=f"a dead letter for {event_id} on {source}'s topic")


async def _put_on(settings: Settings, topic: str, value: bytes, headers: list[tuple[str, bytes]]) -> str:
    """Write a message straight onto a dead-letter topic, as a hostile client could; its id."""
    producer = inspector_producer(settings)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, value=value, key=b"hostile", headers=headers)
    finally:
        await producer.stop()
    return f"bus:{sent.partition}:{sent.offset}"


async def _unregistered_key(pool: asyncpg.Pool, sealer: PayloadSealer) -> SigningKey:
    """A signing key of a fresh office that the key registry does not publish (yet)."""
    office = f"dlq-{uuid.uuid4().hex[:8]}"
    await ensure_office(pool, office, f"Dead letter test office {office}", sealer)
    return SigningKey(f"{office}.{uuid.uuid4().hex[:8]}", office, Ed25519PrivateKey.generate())


async def _register(pool: asyncpg.Pool, key: SigningKey, sealer: PayloadSealer) -> None:
    """The fix: the office's key goes into the registry (the office's old key retires)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE office_signing_key SET retired_at = now() WHERE office = $1 AND retired_at IS NULL",
            key.office,
        )
        await conn.execute(
            "INSERT INTO office_signing_key (key_id, office, public_key, sealed_private_key, created_at)"
            " VALUES ($1, $2, $3, $4, now() - interval '1 hour')",
            key.key_id,
            key.office,
            key.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            sealer.seal(
                key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
                key.key_id.encode(),
            ),
        )


async def _record(
    settings: Settings, pool: asyncpg.Pool, key: SigningKey, subject_id: str = "", nino: str = "AB123456C"
) -> str:
    """A death recorded as intake records one (intake record and sealed outbox original),
    signed with ``key``; the relay publishes it. Its event id."""
    subject_id = subject_id or f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject_id, nino=nino, key=key)
    now = datetime.now(UTC)
    await record_event(
        pool,
        NewEvent(
            reference=new_reference(now),
            event_id=uuid.UUID(event_id),
            event_type="DeathRegistered",
            subject_id=subject_id,
            registration_office=key.office,
            recorded_by="test registrar",
            recorded_at=now,
            idempotency_key=None,
            request_fingerprint=hashlib.sha256(event_id.encode()).hexdigest(),
            consents=[],
            topic=Topics(settings.topic_prefix).life_events,
            message_key=subject_id.encode(),
            message_value=PayloadSealer.from_settings(settings).seal(value, uuid.UUID(event_id)),
            headers=headers,
        ),
    )
    return event_id


async def _final_receipts(pool: asyncpg.Pool, event_id: str) -> dict[str, str]:
    rows = await pool.fetch(
        "SELECT agency, outcome FROM delivery_receipt"
        " WHERE event_id = $1 AND outcome IN ('APPLIED', 'REJECTED')",
        uuid.UUID(event_id),
    )
    return {r["agency"]: r["outcome"] for r in rows}


async def test_a_dead_letter_redriven_after_its_cause_is_fixed_reaches_its_agencies_and_gets_receipts(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool
) -> None:
    key = await _unregistered_key(pool, PayloadSealer.from_settings(services))
    event_id = await _record(services, pool, key)
    letter = await _letter_for(services, pool, event_id, "bus")
    assert "not in the key registry" in (letter.reason or "")
    assert letter.component == "router" and letter.origin_topic == Topics(services.topic_prefix).life_events

    code, listed = await _tuo(services, "dlq", "list", "--agency", "bus", "--limit", "10000")
    assert code == 0, listed
    line = next(line for line in listed.splitlines() if str(letter.id) in line)
    assert event_id in line and "DeathRegistered" in line and "router" in line and "republished" not in line
    code, shown = await _tuo(services, "dlq", "show", str(letter.id), "--reason", "why it failed")
    assert code == 0, shown
    assert "not in the key registry" in shown and "republish the stored original" in shown
    assert "deceased" in shown, "the field names are shown"
    assert "Example" not in shown and "AB123456C" not in shown, "never the personal data itself"
    assert await _final_receipts(pool, event_id) == {}, "stuck: no agency has it"

    await _register(pool, key, PayloadSealer.from_settings(services))  # the cause, fixed
    code, out = await _tuo(
        services,
        "dlq",
        "redrive",
        str(letter.id),
        "--reason",
        "office key registered late",
        "--by",
        "Ops Olu",
    )
    assert code == 0, out
    assert "redriven" in out and "1 redriven" in out

    async def receipted() -> dict[str, str] | None:
        found = await _final_receipts(pool, event_id)
        return found if set(STATUTORY) <= set(found) else None

    receipts = await eventually(receipted, timeout=90, what="receipts from hmrc, dwp and council-leeds")
    assert receipts["hmrc"] == receipts["dwp"] == "APPLIED"
    recorded = await pool.fetchrow(
        "SELECT dead_letter, action, requested_by, reason FROM dead_letter_redrive WHERE event_id = $1",
        uuid.UUID(event_id),
    )
    assert dict(recorded) == {
        "dead_letter": str(letter.id),
        "action": "republished",
        "requested_by": "Ops Olu",
        "reason": "office key registered late",
    }

    # Again without --again: nothing is sent twice.
    before = await _written(pool)
    code, out = await _tuo(services, "dlq", "redrive", str(letter.id), "--reason", "try once more")
    assert code == 0, out
    assert "skipped" in out and "redriven already by Ops Olu" in out and "0 redriven" in out
    assert await _written(pool) == before
    # With --again, still not routed twice: it has been routed since.
    code, out = await _tuo(services, "dlq", "redrive", str(letter.id), "--reason", "try once more", "--again")
    assert code == 1 and "has been routed since" in out, out
    assert await _written(pool) == before

    code, listed = await _tuo(services, "dlq", "list", "--agency", "bus", "--limit", "10000")
    line = next(line for line in listed.splitlines() if str(letter.id) in line)
    assert "republished by Ops Olu" in line and "office key registered late" in line


async def test_an_agency_dead_letter_redriven_reaches_that_agency_only(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    topics = Topics(services.topic_prefix)
    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()
    event_id: str = accepted["event_id"]

    async def delivered_to_hmrc() -> list[ConsumerRecord[bytes, bytes]]:
        return [
            r for r in await read_topic(services, topics.agency("hmrc")) if header(r, "ce_id") == event_id
        ]

    (genuine,) = await eventually(delivered_to_hmrc, timeout=60, what="the event at hmrc")
    # A copy damaged on the way: hmrc's SDK cannot decode it and dead-letters it.
    producer = inspector_producer(services)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.agency("hmrc"),
            value=(genuine.value or b"")[:40],
            key=genuine.key,
            headers=list(genuine.headers),
        )
    finally:
        await producer.stop()
    letter = await _letter_for(services, pool, event_id, "hmrc")
    assert letter.component == "agency:hmrc" and letter.id.source == "hmrc"

    copies_before = {
        agency: sum(header(r, "ce_id") == event_id for r in await read_topic(services, topics.agency(agency)))
        for agency in (*STATUTORY, "dvla")
    }
    code, out = await _tuo(
        services, "dlq", "redrive", str(letter.id), "--reason", "copy was damaged in transit"
    )
    assert code == 0 and "redelivered to hmrc" in out, out

    async def redelivered() -> bool:
        at_hmrc = sum(
            header(r, "ce_id") == event_id for r in await read_topic(services, topics.agency("hmrc"))
        )
        return at_hmrc == copies_before["hmrc"] + 1

    await eventually(redelivered, timeout=60, what="the stored original redelivered to hmrc")
    duplicate = await eventually(
        lambda: pool.fetchval(
            "SELECT outcome FROM receipt_duplicate WHERE event_id = $1 AND agency = 'hmrc'",
            uuid.UUID(event_id),
        ),
        timeout=60,
        what="hmrc's receipt for the redelivered copy",
    )
    assert duplicate == "APPLIED", "hmrc answers, and applies nothing twice"
    for agency in ("dwp", "council-leeds", "dvla"):
        now = sum(header(r, "ce_id") == event_id for r in await read_topic(services, topics.agency(agency)))
        assert now == copies_before[agency], f"{agency} was sent it again"
    row = await pool.fetchrow(
        "SELECT action, agency, redelivery_id FROM dead_letter_redrive WHERE dead_letter = $1", str(letter.id)
    )
    assert (row["action"], row["agency"]) == ("redelivered", "hmrc") and row["redelivery_id"] is not None
    code, listed = await _tuo(services, "dlq", "list", "--agency", "hmrc", "--limit", "10000")
    assert code == 0 and "redelivered to hmrc" in next(
        line for line in listed.splitlines() if str(letter.id) in line
    )


async def test_hostile_dead_letters_are_refused_and_left_in_place(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    topics = Topics(services.topic_prefix)
    garbage = await _put_on(services, topics.dead_letters, bytes(range(256)), [])
    forged = await _put_on(
        services,
        topics.dead_letters,
        b"\x00\x00\x00\x00\x01forged",
        [
            *CloudEvent(id=str(uuid.uuid4()), type="DeathRegistered", source="/offices/leeds").headers(),
            ("tuo_dlq_reason", b"[bold red]pay here[/] \x1b[2J"),
            ("tuo_dlq_component", b"router"),
            ("tuo_dlq_topic", topics.life_events.encode()),
        ],
    )
    # A real event that was routed: a forged dead letter for it must not route it twice.
    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM routing_decision WHERE event_id = $1", uuid.UUID(accepted["event_id"])
        ),
        timeout=60,
        what="the real event routed",
    )
    replayed = await _put_on(
        services,
        topics.dead_letters,
        b"",
        [
            *CloudEvent(id=accepted["event_id"], type="DeathRegistered", source="/offices/leeds").headers(),
            ("tuo_dlq_topic", topics.life_events.encode()),
        ],
    )
    receipt = await _put_on(
        services,
        topics.dead_letters,
        b"",
        [
            *CloudEvent(id=accepted["event_id"], type="DeliveryReceipt", source="/agencies/hmrc").headers(),
            ("tuo_dlq_topic", topics.receipts("hmrc").encode()),
        ],
    )

    code, shown = await _tuo(services, "dlq", "show", forged, "--reason", "a hostile letter")
    assert code == 0, shown
    assert "[bold red]pay here[/] \\x1b[2J" in shown, "markup and escape codes are shown, not obeyed"
    code, shown = await _tuo(services, "dlq", "show", garbage, "--reason", "a hostile letter")
    assert code == 0 and "(no ce_id)" in shown and "does not decode" in shown, shown

    before = await _written(pool)
    expected = {
        garbage: "it has no event id (its ce_id header is missing)",
        forged: "was recorded by this bus's intake",
        replayed: "has been routed since",
        receipt: "receipts are sent again by the agency",
    }
    for letter_id, why in expected.items():
        code, out = await _tuo(services, "dlq", "redrive", letter_id, "--reason", "hostile test")
        assert code == 1, out
        assert "refused" in out and why in " ".join(out.split()), (letter_id, out)
    code, out = await _tuo(services, "dlq", "redrive", *expected, "--reason", "hostile test")
    assert code == 1 and "0 redriven, 0 redriven before (skipped), 4 refused and left in place" in out, out
    assert await _written(pool) == before, "nothing written"
    for letter_id in expected:
        code, shown = await _tuo(services, "dlq", "show", letter_id, "--reason", "a hostile id")
        assert code == 0 and letter_id in shown and "republished" not in shown, "still there, as it was"

    # --all is safe to run twice: the second run redrives nothing that the first did.
    code, first = await _tuo(services, "dlq", "redrive", "--all", "--reason", "sweep after the fix")
    assert code == 0, first
    swept = _outcomes(first)
    assert {swept[i] for i in expected} == {"refused"}, first
    code, second = await _tuo(services, "dlq", "redrive", "--all", "--reason", "sweep after the fix")
    assert code == 0, second
    again = _outcomes(second)
    assert {again[i] for i in expected} == {"refused"}, second
    for letter_id in (i for i, outcome in swept.items() if outcome == "redriven"):
        assert again[letter_id] == "skipped", f"{letter_id} was redriven twice"


def _outcomes(output: str) -> dict[str, str]:
    """Dead letter id → outcome, from `tuo dlq redrive`'s table."""
    found = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) >= 2 and cells[1] in ("redriven", "skipped", "refused"):
            found[cells[0]] = cells[1]
    return found


@pytest.mark.parametrize(
    ("letter_id", "message"),
    [
        ("../x", "is not a dead letter's id"),
        ("bus:-1:0", "is not a dead letter's id"),
        ("bus:0:99999999999999999999999", "is not a dead letter's id"),
        ("bus:\u0663:0", "is not a dead letter's id"),  # an Arabic-Indic digit three
        ("", "is not a dead letter's id"),
        ("bus:00:1", "is not a dead letter's id"),
        ("BUS:0:1", "is not a dead letter's id"),
        ("bus:0:1\n", "is not a dead letter's id"),
        ("bus:0:1; rm -rf /", "is not a dead letter's id"),
        ("x" * 5000, "is not a dead letter's id"),
        ("[red]bus[/]:0:1", "is not a dead letter's id"),
        ("bus:7:0", "has no partition 7"),
        ("bus:0:999999999999", "no such dead letter"),
        ("nobody-here:0:0", "there is no dead-letter topic for 'nobody-here'"),
    ],
)
async def test_bad_dead_letter_ids_are_refused_clearly(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool, letter_id: str, message: str
) -> None:
    before = await _written(pool)
    for args in (
        ("show", letter_id, "--reason", "a good reason"),
        ("redrive", letter_id, "--reason", "a good reason"),
    ):
        code, out = await _tuo(services, "dlq", *args)
        assert code == 1, out
        assert any(line.startswith("Error:") and message in line for line in out.splitlines()), out
        assert "Traceback" not in out, "one short error, no traceback"
    assert await _written(pool) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give a reason of 3 to 500 characters (yours has 0)"),
        (("--reason", ""), "give a reason of 3 to 500 characters (yours has 0)"),
        (("--reason", "  no  "), "give a reason of 3 to 500 characters (yours has 2)"),
        (("--reason", "x" * 501), "give a reason of 3 to 500 characters (yours has 501)"),
        (("--reason", "fixed\x1b[2J it"), "the reason has control characters"),
        (("--reason", "fine reason", "--by", "x" * 201), "--by names who asks"),
        (("--reason", "fine reason", "--all"), "name dead letters by id, or use --all"),
    ],
)
async def test_a_redrive_needs_a_reason_of_sensible_length(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool, args: tuple[str, ...], message: str
) -> None:
    topics = Topics(services.topic_prefix)
    letter_id = await _put_on(services, topics.dead_letters, b"x", [])
    before = await _written(pool)
    code, out = await _tuo(services, "dlq", "redrive", letter_id, *args)
    assert code == 1 and message in " ".join(out.split()), out
    assert await _written(pool) == before


async def test_list_refuses_bad_options_and_names_missing_topics(
    services: Settings, pool: asyncpg.Pool
) -> None:
    for args, message in (
        (("--limit", "0"), "--limit must be from 1 to 10000"),
        (("--limit", "100001"), "--limit must be from 1 to 10000"),
        (("--agency", "../../etc"), "is not an agency name"),
        (("--agency", "no-such-agency"), "there is no dead-letter topic for 'no-such-agency'"),
    ):
        code, out = await _tuo(services, "dlq", "list", *args)
        assert code == 1 and message in out, (args, out)
    code, out = await _tuo(services, "dlq", "redrive", "--reason", "nothing named")
    assert code == 1 and "name dead letters by id, or use --all" in out


def test_a_dead_letter_id_has_one_spelling() -> None:
    parsed = dlq.DeadLetterId.parse("dwp:0:3")
    assert (parsed.source, parsed.partition, parsed.offset) == ("dwp", 0, 3)
    assert str(dlq.DeadLetterId.parse("bus:12:345")) == "bus:12:345"
    assert dlq.DeadLetterId.parse("council-leeds:0:0").topic("tuo") == "tuo.dead-letters.agency.council-leeds"
    assert dlq.DeadLetterId.parse("bus:0:0").topic("tuo") == "tuo.dead-letters"
    with pytest.raises(dlq.NotADeadLetterId):
        dlq.DeadLetterId.parse("bus:0:1 ")


def test_age_reads_like_a_person_would_say_it() -> None:
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert dlq.age(now - timedelta(seconds=5), now) == "5s"
    assert dlq.age(now - timedelta(minutes=3, seconds=2), now) == "3m 2s"
    assert dlq.age(now - timedelta(hours=2, minutes=5), now) == "2h 5m"
    assert dlq.age(now - timedelta(days=4, hours=1), now) == "4d 1h"


def _letter(
    source: str, origin: str | None, event_id: uuid.UUID | None, **headers: str
) -> dlq.StoredDeadLetter:
    return dlq.StoredDeadLetter(
        id=dlq.DeadLetterId(source, 0, 1),
        topic=dlq.dead_letter_topic("tuo", source),
        dead_lettered_at=datetime.now(UTC),
        component="router",
        reason="why",
        origin_topic=origin,
        origin_partition=0,
        origin_offset=0,
        event_id=event_id,
        claimed_id=None if event_id is None else str(event_id),
        event_type="DeathRegistered",
        key_size=0,
        value_size=0,
        header_names=[],
        headers=headers,
    )


def test_what_a_redrive_does_depends_on_where_the_dead_letter_came_from() -> None:
    event = uuid.uuid4()
    plan = dlq.plan_redrive
    assert isinstance(plan("tuo", _letter("bus", "tuo.life-events", event)), dlq.Republish)
    assert plan("tuo", _letter("dwp", "tuo.agency.dwp", event)) == dlq.Redeliver("dwp")
    redelivery = _letter("bus", "tuo.redeliveries", event, tuo_redeliver_to="dvla")
    assert plan("tuo", redelivery) == dlq.Redeliver("dvla")
    refusals = {
        "a redelivery without a valid tuo_redeliver_to": _letter("bus", "tuo.redeliveries", event),
        "receipts are sent again by the agency": _letter("bus", "tuo.receipts.dwp", event),
        "the router records decisions": _letter("bus", "tuo.routing-decisions", event),
        "says it came from tuo.agency.hmrc": _letter("dwp", "tuo.agency.hmrc", event),
        "which is not redriven": _letter("bus", "elsewhere", event),
        "it has no event id": _letter("bus", "tuo.life-events", None),
    }
    for why, letter in refusals.items():
        with pytest.raises(dlq.RedriveRefused, match=why):
            plan("tuo", letter)
