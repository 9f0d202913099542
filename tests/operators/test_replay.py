"""Replay: stored events sent again to one named agency, decided on today's
subscriptions and consent, each once at the agency however often it runs, and
resumable after being killed half-way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from citizens.data_tracker import received
from consumers.sdk import AgencyConsumer, DeliveredEvent
from operators import replay
from operators.replay import REPLAY_ID_HEADER, ReplayRefused, Selection
from operators.services import RunningBus
from producers.accept import new_reference
from producers.accounts import issue_token
from router import looks
from router.store import agencies, event_status, record_consent, upsert_subscription
from runtime.access import onboard_agency, suspend_agency
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode
from tests.support import death_registration, eventually, header, kafka_env, random_nino, read_topic, tuo_cli

TUO = str(Path(sys.executable).parent / "tuo")
PROJECT = Path(__file__).resolve().parents[2]


# --- Selection: pure checks, no services ----------------------------------------------


def test_a_replay_must_say_which_events_it_covers() -> None:
    with pytest.raises(ReplayRefused, match="say which events"):
        Selection.of()
    assert Selection.of(everything=True).everything
    with pytest.raises(ReplayRefused, match="cannot be combined"):
        Selection.of(everything=True, event_types=["DeathRegistered"])


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"event_ids": ["not-a-uuid"]}, "is not an event id"),
        ({"event_ids": ["'; DROP TABLE replay; --"]}, "is not an event id"),
        ({"references": ["TUO-2026-../x"]}, "is not a reference number"),
        # O, I, L and U are never issued (read aloud, they are mistaken for 0, 1 and V).
        ({"references": ["TUO-2026-ABCO-EFGH"]}, "is not a reference number"),
        ({"references": ["TUO-2026-ABCD-EFGU"]}, "is not a reference number"),
        ({"event_types": ["BirthdayParty"]}, "unknown event type"),
        ({"subject": "Jo Citizen"}, "subject id"),
        ({"event_ids": [str(uuid.uuid4()) for _ in range(replay.MAX_EVENT_IDS + 1)]}, "at most"),
        (
            {"since": datetime(2026, 2, 1, tzinfo=UTC), "until": datetime(2026, 1, 1, tzinfo=UTC)},
            "earlier than",
        ),
    ],
)
def test_bad_selections_are_refused_with_a_reason(criteria: dict[str, Any], message: str) -> None:
    with pytest.raises(ReplayRefused, match=message):
        Selection.of(**criteria)


def test_every_reference_intake_issues_is_one_replay_accepts() -> None:
    issued = [new_reference(datetime.now(UTC)) for _ in range(500)]
    assert Selection.of(references=[r.lower() for r in issued]).references == tuple(issued)


def test_a_nino_selects_its_pseudonymous_subject_and_is_not_kept() -> None:
    chosen = Selection.of(subject="ab 12 34 56 c", pseudonym_key=lambda: b"k" * 32)
    assert chosen.subject_id is not None and chosen.subject_id.startswith("n-")
    assert "AB123456C" not in str(chosen.as_json())
    assert Selection.from_json(chosen.as_json()) == chosen


# --- Against the real bus --------------------------------------------------------------


def _agency_name() -> str:
    return f"rp{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def onboarded(pool: asyncpg.Pool) -> AsyncIterator[list[str]]:
    """The agencies a test onboards; their subscriptions are suspended afterwards, so
    that later tests (the registrars' forms ask about every consent-based agency) do
    not meet them."""
    agencies: list[str] = []
    yield agencies
    await pool.execute(
        "UPDATE subscription SET status = 'suspended' WHERE agency = ANY($1::text[])", agencies
    )


async def _consent_agency(services: Settings, pool: asyncpg.Pool, agency: str, onboarded: list[str]) -> None:
    """A newly onboarded agency told of deaths on the informant's consent."""
    onboarded.append(agency)
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")
    await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="consent",
        statute=None,
        fields=None,
        condition=None,
    )


async def _consent_online(pool: asyncpg.Pool, event_id: str, agency: str) -> None:
    """The person's family gives consent for the agency on the citizens' pages, after the event."""
    subject = await pool.fetchval(
        "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(event_id)
    )
    await record_consent(
        pool,
        subject_id=subject,
        agency=agency,
        event_type="DeathRegistered",
        choice="given",
        recorded_by="citizen",
    )


async def _register_deaths(
    intake: httpx.AsyncClient, n: int, consent_for: Callable[[int], list[str]]
) -> list[dict[str, Any]]:
    accepted = []
    for i in range(n):
        body = death_registration(
            deceased={
                "given_names": "Pat",
                "family_name": "Example",
                "date_of_birth": "1941-03-02",
                "nino": random_nino(),
            },
            consents=[{"agency": a, "choice": "given"} for a in consent_for(i)],
        )
        response = await intake.post("/v1/death-registrations", json=body)
        assert response.status_code == 201, response.text
        accepted.append(response.json())
    return accepted


async def _published(pool: asyncpg.Pool, events: list[dict[str, Any]]) -> None:
    """Wait until every event is on the bus (replay sends stored, published events) and the
    router's decisions on it are recorded."""

    async def all_published() -> bool | None:
        unpublished = await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE event_id = ANY($1::uuid[]) AND published_at IS NULL",
            [e["event_id"] for e in events],
        )
        return True if unpublished == 0 else None

    async def all_routed() -> bool | None:  # so an agency onboarded next is not among them
        routed = await pool.fetchval(
            "SELECT count(DISTINCT event_id) FROM routing_decision WHERE event_id = ANY($1::uuid[])",
            [e["event_id"] for e in events],
        )
        return True if routed == len(events) else None

    await eventually(all_published, timeout=60, what="the events published")
    await eventually(all_routed, timeout=60, what="the events routed")


@asynccontextmanager
async def _agency_consumer(
    services: Settings, pool: asyncpg.Pool, agency: str
) -> AsyncIterator[Counter[str]]:
    """The agency's own consumer (the SDK, which de-duplicates by event id), counting
    how many times its handler applied each event."""
    applied: Counter[str] = Counter()

    async def record(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        applied[event.event_id] += 1

    stop = asyncio.Event()
    running = asyncio.create_task(AgencyConsumer(services, pool, agency, record).run(stop))
    try:
        yield applied
    finally:
        stop.set()
        await running


async def _replayed(services: Settings, agency: str, replay_id: str) -> list[str]:
    """Event ids on the agency's topic that came from this replay, in topic order."""
    records = await read_topic(services, Topics(services.topic_prefix).agency(agency))
    return [header(r, "ce_id") or "" for r in records if header(r, REPLAY_ID_HEADER) == replay_id]


async def _duplicate_receipts(services: Settings, agency: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for record in await read_topic(services, Topics(services.topic_prefix).receipts(agency)):
        receipt = decode(record.value or b"")[1]
        if receipt.get("duplicate"):
            found[str(receipt["event_id"])] += 1
    return found


async def _tuo(services: Settings, *args: str) -> tuple[int, str]:
    return await asyncio.to_thread(tuo_cli, services, *args)


def _replay_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("Replay "))
    return line.split()[1].rstrip(":")


@pytest.mark.integration
async def test_replay_sends_only_entitled_events_only_to_that_agency_and_each_is_applied_once(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    # Five deaths: the informant consents to telling the agency for the first four.
    events = await _register_deaths(intake, 5, lambda i: [agency] if i < 4 else [])
    ids = [e["event_id"] for e in events]
    async with _agency_consumer(services, pool, agency) as applied:
        await eventually(
            lambda: _true_when(set(applied) == set(ids[:4])), timeout=90, what="the first four applied"
        )
        await _published(pool, events)
        # Later, the second person's family withdraws consent for this agency.
        subject = await pool.fetchval(
            "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(ids[1])
        )
        await pool.execute(
            "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
            " VALUES ($1, $2, 'DeathRegistered', 'withdrawn', 'citizen')",
            subject,
            agency,
        )
        references = [arg for e in events for arg in ("--reference", e["reference"])]
        runs = []
        for attempt in ("first", "second"):
            code, output = await _tuo(
                services,
                "replay",
                "run",
                agency,
                *references,
                "--reason",
                f"agency lost a day ({attempt} try)",
            )
            assert code == 0, output
            assert "3 of 5 events sent" in output, output
            assert "2 no consent today" in output, output
            runs.append(_replay_id(output))

        for replay_id in runs:
            assert sorted(await _replayed(services, agency, replay_id)) == sorted([ids[0], ids[2], ids[3]])
        # The agency's consumer saw each repeat as one: a duplicate receipt, nothing applied again.
        await eventually(
            lambda: _when_counts(_duplicate_receipts(services, agency), {ids[0]: 2, ids[2]: 2, ids[3]: 2}),
            timeout=90,
            what="duplicate receipts for both replays",
        )
        assert applied == Counter({i: 1 for i in ids[:4]})

    # Only that agency: no other agency's topic carries either replay.
    for other in await agencies(pool):
        if other != agency:
            for replay_id in runs:
                assert await _replayed(services, other, replay_id) == [], f"replay reached {other}"
    # Both replays are on record: who, why, how many.
    recorded = await pool.fetch("SELECT * FROM replay WHERE id = ANY($1::uuid[]) ORDER BY started_at", runs)
    assert [r["sent"] for r in recorded] == [3, 3]
    assert all(r["status"] == "finished" and not r["dry_run"] for r in recorded)
    assert all('"WITHHELD_NO_CONSENT": 2' in r["withheld"] for r in recorded)
    assert recorded[0]["reason"] == "agency lost a day (first try)"
    assert (
        await pool.fetchval("SELECT count(*) FROM replay_delivery WHERE replay_id = ANY($1::uuid[])", runs)
        == 6
    )


async def _true_when(condition: bool) -> bool | None:
    return True if condition else None


async def _when_counts(found: Any, expected: dict[str, int]) -> bool | None:
    counts = await found
    return True if all(counts[k] >= n for k, n in expected.items()) else None


@pytest.mark.integration
async def test_a_new_agency_gets_the_history_it_is_entitled_to_and_a_dry_run_sends_nothing(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    agency = _agency_name()
    events = await _register_deaths(intake, 4, lambda i: [])
    await _published(pool, events)
    ids = [e["event_id"] for e in events]
    await _consent_agency(services, pool, agency, onboarded)  # onboarded after the events were routed
    for event_id in ids[0::2]:  # two of the people's families consent online afterwards
        await _consent_online(pool, event_id, agency)
    references = [arg for e in events for arg in ("--reference", e["reference"])]

    code, output = await _tuo(
        services, "replay", "run", agency, *references, "--dry-run", "--reason", "onboarding"
    )
    assert code == 0, output
    assert "2 of 4 events would be sent" in output and "2 no consent today" in output, output
    dry = _replay_id(output)
    assert await _replayed(services, agency, dry) == []
    assert await pool.fetchval("SELECT dry_run FROM replay WHERE id = $1", uuid.UUID(dry))

    async with _agency_consumer(services, pool, agency) as applied:
        code, output = await _tuo(services, "replay", "run", agency, *references, "--reason", "onboarding")
        assert code == 0, output
        # The SDK verified the office's signature on each copy and applied it.
        await eventually(
            lambda: _true_when(set(applied) == {ids[0], ids[2]}), timeout=90, what="the history applied"
        )
    assert sorted(await _replayed(services, agency, _replay_id(output))) == sorted([ids[0], ids[2]])
    # The person (and the registrar's status page) sees that this agency was told, by replay.
    told = await event_status(pool, events[0]["reference"])
    assert told is not None
    entry = next(a for a in told["agencies"] if a["agency"] == agency)
    assert entry["decision"] == "delivered" and entry["replays"] == 1 and entry["legal_basis"] == "consent"
    subject = await pool.fetchval(
        "SELECT subject_id FROM intake_record WHERE event_id = $1", uuid.UUID(ids[0])
    )
    reported = await received(pool, subject, None)
    assert any(d.agency == agency and d.told for e in reported for d in e.deliveries)
    not_told = await event_status(pool, events[1]["reference"])
    assert not_told is not None
    assert all(a["agency"] != agency or a["decision"] != "delivered" for a in not_told["agencies"])


@pytest.mark.integration
async def test_a_replay_killed_half_way_and_resumed_ends_as_an_uninterrupted_one(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    killed, whole = _agency_name(), _agency_name()
    for agency in (killed, whole):
        await _consent_agency(services, pool, agency, onboarded)
    events = await _register_deaths(intake, 30, lambda i: [killed, whole] if i % 3 else [])
    await _published(pool, events)
    entitled = sorted(e["event_id"] for i, e in enumerate(events) if i % 3)
    references = [arg for e in events for arg in ("--reference", e["reference"])]

    code, output = await _tuo(services, "replay", "run", whole, *references, "--reason", "comparison")
    assert code == 0, output
    uninterrupted = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", uuid.UUID(_replay_id(output)))

    # Five events a second, so a batch is five events and the whole takes six seconds.
    process = await asyncio.create_subprocess_exec(
        TUO,
        "replay",
        "run",
        killed,
        *references,
        "--rate",
        "5",
        "--reason",
        "agency lost a day",
        cwd=PROJECT,
        env=_env(services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )

    async def half_way() -> asyncpg.Record | None:
        row = await pool.fetchrow("SELECT * FROM replay WHERE agency = $1", killed)
        return row if row is not None and 10 <= row["examined"] < 25 else None

    started = await eventually(half_way, timeout=60, what="the replay half-way")
    process.send_signal(signal.SIGKILL)
    await process.wait()
    interrupted = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", started["id"])
    assert interrupted["status"] == "running" and interrupted["examined"] < 30

    code, output = await _tuo(services, "replay", "resume", str(started["id"]))
    assert code == 0, output
    resumed = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", started["id"])
    for column in ("status", "selected", "examined", "sent", "withheld"):
        assert resumed[column] == uninterrupted[column], column
    assert resumed["attempts"] == 2
    # Every entitled event reached the agency (a batch caught by the kill may be sent
    # twice; the agency's SDK de-duplicates it) and its consumer applies each once.
    on_topic = await _replayed(services, killed, str(started["id"]))
    assert sorted(set(on_topic)) == entitled
    assert sorted(await _replayed(services, whole, str(uninterrupted["id"]))) == entitled
    async with _agency_consumer(services, pool, killed) as applied:
        await eventually(lambda: _true_when(set(applied) == set(entitled)), timeout=90, what="all applied")
    assert set(applied.values()) == {1}
    # Resuming a finished replay is refused: a new replay is a new decision, on record.
    code, output = await _tuo(services, "replay", "resume", str(started["id"]))
    assert code == 1 and "has finished" in output


def _env(services: Settings) -> dict[str, str]:
    assert services.pseudonym_key is not None and services.data_key is not None
    return {
        **{name: value for name, value in os.environ.items() if not name.startswith("TUO_")},
        **kafka_env(services),
        "TUO_DATABASE_URL": services.require_database_url(),
        "TUO_PSEUDONYM_KEY": services.pseudonym_key.get_secret_value(),
        "TUO_DATA_KEY": services.data_key.get_secret_value(),
        "TUO_TOPIC_PREFIX": services.topic_prefix,
        "TUO_STATE_DIR": str(services.state_dir),
        "TUO_LOG_LEVEL": "WARNING",
    }


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dwp", "--everything"], "Missing option '--reason'"),
        (["dwp", "--everything", "--reason", "x"], "3 to 500 characters"),
        (["dwp", "--everything", "--reason", "x" * 501], "3 to 500 characters"),
        (["dwp", "--reason", "no selection"], "say which events"),
        (["dwp", "--event-id", "42", "--reason", "bad id"], "is not an event id"),
        (["dwp", "--since", "yesterday", "--reason", "bad time"], "is not a date and time"),
        (["dwp", "--event-type", "<script>", "--reason", "bad type"], "unknown event type"),
        (["../../etc", "--everything", "--reason", "hostile agency"], "is not an agency code"),
        (["nobody-here", "--everything", "--reason", "unknown agency"], "no agency 'nobody-here'"),
        (["dwp", "--everything", "--rate", "0", "--reason", "no rate"], "--rate must be between"),
        (["dwp", "--everything", "--rate", "99999999", "--reason", "huge rate"], "--rate must be between"),
        (["dwp", "--everything", "--reason", "long name", "--by", "y" * 101], "1 to 100 characters"),
    ],
)
async def test_bad_replay_requests_are_refused_clearly_and_record_nothing(
    services: Settings, pool: asyncpg.Pool, args: list[str], message: str
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM replay")
    code, output = await _tuo(services, "replay", "run", *args)
    assert code != 0
    assert message in " ".join(output.split()), output
    assert await pool.fetchval("SELECT count(*) FROM replay") == before


@pytest.mark.integration
@pytest.mark.parametrize(
    ("replay_id", "message"),
    [("not-a-uuid", "is not a replay id"), (str(uuid.uuid4()), "no replay"), ("", "is not a replay id")],
    ids=["not a uuid", "unknown", "empty"],
)
async def test_resuming_an_unknown_replay_is_refused(
    services: Settings, pool: asyncpg.Pool, replay_id: str, message: str
) -> None:
    code, output = await _tuo(services, "replay", "resume", replay_id)
    assert code == 1 and message in output, output


@pytest.mark.integration
async def test_a_suspended_agency_gets_no_replay(
    services: Settings, pool: asyncpg.Pool, onboarded: list[str]
) -> None:
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    await suspend_agency(services, pool, agency, by="tests", reason="its system was compromised")
    code, output = await _tuo(services, "replay", "run", agency, "--everything", "--reason", "should not go")
    assert code == 1 and "is suspended" in output, output


@pytest.mark.integration
async def test_replay_list_shows_who_asked_why_and_how_many(
    services: Settings, pool: asyncpg.Pool, onboarded: list[str]
) -> None:
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    since = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    code, output = await _tuo(
        services, "replay", "run", agency, "--since", since, "--reason", "nothing yet", "--by", "ops-alex"
    )
    assert code == 0 and "0 of 0 events sent" in output, output
    code, output = await _tuo(services, "replay", "list")
    assert code == 0
    row = next(line for line in output.splitlines() if agency in line)
    assert "ops-alex" in row and "nothing yet" in row and "finished" in row


@pytest.mark.integration
async def test_a_correction_is_replayed_after_its_original_within_the_fields_the_agency_may_have(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    (original,) = await _register_deaths(intake, 1, lambda i: [])
    response = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={
            "changes": [
                {"field": "deceased.date_of_birth", "value": "1941-03-12"},
                {"field": "place_of_death", "value": "St James's University Hospital"},
            ],
            "reason": "misread the certificate",
        },
    )
    assert response.status_code == 201, response.text
    correction = response.json()
    await _published(pool, [original, correction])
    agency, late = _agency_name(), _agency_name()
    for name in (agency, late):
        await _consent_agency(services, pool, name, onboarded)
        await upsert_subscription(  # this agency may know who died and when, not where
            pool,
            agency=name,
            event_type="DeathRegistered",
            legal_basis="consent",
            statute=None,
            fields=["deceased", "date_of_death"],
            condition=None,
        )
    for name in (agency, late):
        await _consent_online(pool, original["event_id"], name)

    # Without its original, a correction goes nowhere: the agency never had what it corrects.
    code, output = await _tuo(
        services, "replay", "run", late, "-r", correction["reference"], "--reason", "only the fix"
    )
    assert code == 0 and "0 of 1 events sent" in output, output

    code, output = await _tuo(
        services,
        "replay",
        "run",
        agency,
        "-r",
        original["reference"],
        "-r",
        correction["reference"],
        "--reason",
        "onboarding",
    )
    assert code == 0 and "2 of 2 events sent" in output, output
    replay_id = _replay_id(output)
    records = await read_topic(services, Topics(services.topic_prefix).agency(agency))
    ours = [r for r in records if header(r, REPLAY_ID_HEADER) == replay_id]
    assert [header(r, "ce_id") for r in ours] == [original["event_id"], correction["event_id"]], "in order"
    first, fix = (decode(r.value or b"")[1] for r in ours)
    assert first["place_of_death"] is None and first["deceased"] is not None, "minimised to today's fields"
    assert first["envelope"]["subject"]["nino"] is None
    assert [c["field"] for c in fix["changes"]] == ["deceased.date_of_birth"], "only changes to fields it has"
    assert fix["envelope"]["subject"]["nino"] is None
    async with _agency_consumer(services, pool, agency) as applied:
        # The SDK checks the office's signature on both copies before applying them.
        await eventually(
            lambda: _true_when(set(applied) == {original["event_id"], correction["event_id"]}),
            timeout=90,
            what="the original and its correction applied",
        )


@pytest.mark.integration
async def test_a_later_correction_reaches_an_agency_that_got_the_original_by_replay(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    (original,) = await _register_deaths(intake, 1, lambda i: [])
    await _published(pool, [original])
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    await _consent_online(pool, original["event_id"], agency)
    code, output = await _tuo(
        services, "replay", "run", agency, "-r", original["reference"], "--reason", "onboarding"
    )
    assert code == 0 and "1 of 1 events sent" in output, output

    # The router, not a replay, routes the correction: the agency is among the original's recipients.
    response = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={"changes": [{"field": "deceased.date_of_birth", "value": "1941-03-12"}], "reason": "misread"},
    )
    assert response.status_code == 201, response.text
    correction = response.json()

    async def corrected() -> list[str] | None:
        records = await read_topic(services, Topics(services.topic_prefix).agency(agency))
        found = [header(r, "ce_id") or "" for r in records if header(r, REPLAY_ID_HEADER) is None]
        return found or None

    assert await eventually(corrected, timeout=90, what="the correction at the agency") == [
        correction["event_id"]
    ]


@pytest.mark.integration
async def test_a_stored_event_whose_signature_does_not_verify_is_not_replayed(
    services: Settings, pool: asyncpg.Pool, onboarded: list[str]
) -> None:
    # An event signed with a key no office registered (the router dead-letters such an event).
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from producers.office_keys import SigningKey
    from runtime.sealing import PayloadSealer
    from tests.support import death_message, office_key

    registered = await office_key(pool, services)
    forged = SigningKey(f"{registered.office}-forged", registered.office, Ed25519PrivateKey.generate())
    subject = f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject, key=forged)
    reference = f"TUO-2026-{uuid.uuid4().hex[:4].upper()}-{uuid.uuid4().hex[:4].upper()}"
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO intake_record (reference, event_id, event_type, subject_id, registration_office,"
            " recorded_by) VALUES ($1, $2, 'DeathRegistered', $3, $4, 'tests')",
            reference,
            uuid.UUID(event_id),
            subject,
            registered.office,
        )
        await conn.execute(
            "INSERT INTO outbox (event_id, topic, message_key, message_value, headers, published_at)"
            " VALUES ($1, $2, $3, $4, $5, now())",
            uuid.UUID(event_id),
            Topics(services.topic_prefix).life_events,
            subject.encode(),
            PayloadSealer.from_settings(services).seal(value, uuid.UUID(event_id)),
            json.dumps([[k, v.decode()] for k, v in headers]),
        )
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    await record_consent(
        pool,
        subject_id=subject,
        agency=agency,
        event_type="DeathRegistered",
        choice="given",
        recorded_by="citizen",
    )
    code, output = await _tuo(services, "replay", "run", agency, "-r", reference, "--reason", "must not go")
    assert code == 0, output
    assert "0 of 1 events sent" in output and "1 not routable" in output, output
    assert await _replayed(services, agency, _replay_id(output)) == []


@pytest.mark.integration
async def test_a_voided_event_is_never_replayed_and_a_corrected_one_goes_with_its_corrections(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    since = datetime.now(UTC)
    plain, voided, corrected = await _register_deaths(intake, 3, lambda i: [])
    until = datetime.now(UTC)  # the void and the corrections are recorded after this
    supervisor = await issue_token(pool, "leeds", "supervisor", "test supervisor system")
    async with httpx.AsyncClient(
        base_url=str(intake.base_url), timeout=10, headers={"Authorization": f"Bearer {supervisor}"}
    ) as as_supervisor:
        response = await as_supervisor.post(
            f"/v1/events/{voided['reference']}/void", json={"reason": "registered in error"}
        )
    assert response.status_code == 201, response.text
    void = response.json()
    fixes = []
    for changes in (
        [
            {"field": "deceased.date_of_birth", "value": "1941-03-12"},
            {"field": "place_of_death", "value": "St James's University Hospital"},
        ],
        [
            {"field": "place_of_death", "value": "Leeds General Infirmary"},
            {"field": "deceased.family_name", "value": "Exampleton"},
        ],
    ):
        response = await intake.post(
            f"/v1/events/{corrected['reference']}/corrections",
            json={"changes": changes, "reason": "misread the certificate"},
        )
        assert response.status_code == 201, response.text
        fixes.append(response.json())
    await _published(pool, [plain, voided, corrected, void, *fixes])

    # A new agency that may know who died and when, not where; every family consents online.
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="consent",
        statute=None,
        fields=["deceased", "date_of_death"],
        condition=None,
    )
    for event in (plain, voided, corrected):
        await _consent_online(pool, event["event_id"], agency)
    # Narrow selections, by time and type, then by reference and type: the void and both
    # corrections lie outside them.
    by_time = ["--since", since.isoformat(), "--until", until.isoformat()]
    selection = [
        *(arg for e in (plain, voided, corrected) for arg in ("-r", e["reference"])),
        "--event-type",
        "DeathRegistered",
    ]

    code, output = await _tuo(
        services,
        "replay",
        "run",
        agency,
        *by_time,
        "--event-type",
        "DeathRegistered",
        "--dry-run",
        "--reason",
        "onboarding, first a look",
    )
    assert code == 0, output
    said = " ".join(output.split())
    assert "2 of 3 events would be sent" in said, output
    assert "2 corrections from outside the selection would be sent with their originals" in said, output
    assert "withheld: 1 voided (never replayed)" in said, output
    dry = _replay_id(output)
    assert await _replayed(services, agency, dry) == [], "a dry run sends nothing"
    row = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", uuid.UUID(dry))
    assert row["dry_run"] and (row["examined"], row["sent"], row["corrections_sent"]) == (3, 2, 2)
    assert json.loads(row["withheld"]) == {"VOIDED": 1}
    assert await pool.fetchval("SELECT count(*) FROM replay_delivery WHERE replay_id = $1", row["id"]) == 0

    async with _agency_consumer(services, pool, agency) as applied:
        code, output = await _tuo(services, "replay", "run", agency, *selection, "--reason", "onboarding")
        assert code == 0, output
        said = " ".join(output.split())
        assert "2 of 3 events sent" in said and "withheld: 1 voided (never replayed)" in said, output
        assert "2 corrections from outside the selection sent with their originals" in said, output
        replay_id = _replay_id(output)
        expected = {plain["event_id"], corrected["event_id"], *(f["event_id"] for f in fixes)}
        # The SDK checks the office's signature on every copy, corrections included, and applies it.
        await eventually(
            lambda: _true_when(set(applied) == expected), timeout=90, what="the replayed events applied"
        )

    records = await read_topic(services, Topics(services.topic_prefix).agency(agency))
    ours = [r for r in records if header(r, REPLAY_ID_HEADER) == replay_id]
    on_topic = [header(r, "ce_id") or "" for r in ours]
    assert voided["event_id"] not in on_topic and void["event_id"] not in on_topic, "the voided event stays"
    assert sorted(on_topic) == sorted(expected)
    # The corrected event first, then its corrections in the order they were recorded (one
    # subject, so one partition, read in order).
    story = [r for r in ours if header(r, "ce_id") in expected - {plain["event_id"]}]
    assert [header(r, "ce_id") for r in story] == [corrected["event_id"], *(f["event_id"] for f in fixes)]
    first, fix1, fix2 = (decode(r.value or b"")[1] for r in story)
    assert first["deceased"]["family_name"] == "Example" and first["place_of_death"] is None
    assert [c["field"] for c in fix1["changes"]] == ["deceased.date_of_birth"], "only fields it gets now"
    assert [c["field"] for c in fix2["changes"]] == ["deceased.family_name"], "only fields it gets now"
    assert all(m["envelope"]["subject"]["nino"] is None for m in (first, fix1, fix2))
    assert "St James" not in str(fix1) and "Infirmary" not in str(fix2)
    # On record: the counts, and every message sent (the two corrections included).
    row = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", uuid.UUID(replay_id))
    assert (row["examined"], row["sent"], row["corrections_sent"]) == (3, 2, 2)
    assert json.loads(row["withheld"]) == {"VOIDED": 1}
    delivered = await pool.fetch(
        "SELECT event_id::text AS event_id FROM replay_delivery WHERE replay_id = $1", row["id"]
    )
    assert {d["event_id"] for d in delivered} == expected
    code, output = await _tuo(services, "replay", "list")
    listed = next(line for line in output.splitlines() if replay_id in line)
    assert "2 + 2 corrections" in listed and "voided" in listed, output


@pytest.mark.integration
async def test_a_correction_of_a_voided_event_is_not_replayed_and_corrections_follow_across_batches(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    agency = _agency_name()
    await _consent_agency(services, pool, agency, onboarded)
    # Both deaths reach the agency through the router (the informant consents), then each is
    # corrected, and the first is voided after its correction.
    struck, kept = await _register_deaths(intake, 2, lambda i: [agency])
    fixes = []
    for event in (struck, kept):
        response = await intake.post(
            f"/v1/events/{event['reference']}/corrections",
            json={"changes": [{"field": "place_of_death", "value": "Home"}], "reason": "misread"},
        )
        assert response.status_code == 201, response.text
        fixes.append(response.json())
    struck_fix, kept_fix = fixes
    supervisor = await issue_token(pool, "leeds", "supervisor", "test supervisor system")
    async with httpx.AsyncClient(
        base_url=str(intake.base_url), timeout=10, headers={"Authorization": f"Bearer {supervisor}"}
    ) as as_supervisor:
        response = await as_supervisor.post(
            f"/v1/events/{struck['reference']}/void", json={"reason": "registered in error"}
        )
    assert response.status_code == 201, response.text
    void = response.json()
    await _published(pool, [struck, kept, *fixes, void])

    # Only the correction of the voided event: it is part of that event, so it never goes.
    code, output = await _tuo(
        services, "replay", "run", agency, "-r", struck_fix["reference"], "--reason", "lost the fix"
    )
    assert code == 0 and "0 of 1 events sent" in output and "1 voided" in output, output
    assert await _replayed(services, agency, _replay_id(output)) == []

    # Everything, one stored event a batch: a correction's own batch comes after its
    # original's, which already sent it (or withheld it) and counted it.
    everything = [arg for e in (struck, kept, *fixes, void) for arg in ("-r", e["reference"])]
    code, output = await _tuo(
        services, "replay", "run", agency, *everything, "--rate", "1", "--reason", "agency lost a day"
    )
    assert code == 0, output
    said = " ".join(output.split())
    assert "3 of 5 events sent" in said and "withheld: 2 voided (never replayed)" in said, output
    assert "from outside the selection" not in said, output
    replay_id = _replay_id(output)
    on_topic = await _replayed(services, agency, replay_id)
    # The void goes again (the agency holds the original from the router); the voided event
    # and its correction do not; the kept event is followed by its correction, once.
    assert sorted(on_topic) == sorted([void["event_id"], kept["event_id"], kept_fix["event_id"]])
    assert on_topic.index(kept["event_id"]) < on_topic.index(kept_fix["event_id"])
    row = await pool.fetchrow("SELECT * FROM replay WHERE id = $1", uuid.UUID(replay_id))
    assert (row["examined"], row["sent"], row["corrections_sent"]) == (5, 3, 0)
    assert json.loads(row["withheld"]) == {"VOIDED": 2}


@pytest.mark.integration
async def test_a_replay_from_routing_facts_sends_what_reading_each_event_the_routers_way_sends(
    bus: RunningBus,
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    onboarded: list[str],
) -> None:
    """Intake keeps each registration's routing facts; a replay decides on them and splices
    each copy from the stored bytes. Byte for byte, header for header, it must send what a
    replay that decodes, verifies and encodes each event sends, and the agency's own
    consumer (the SDK: signature and every disclosed item checked) must apply each."""
    events = []
    for n in range(4):
        executor = {"given_names": "Sam", "family_name": "Executor", "relationship": "solicitor"}
        body = death_registration(
            deceased={"given_names": "Pat", "family_name": "Example", "nino": random_nino()},
            executor={**executor, "nino": random_nino()} if n % 2 else None,  # with a part, and null
            consents=[],
        )
        response = await intake.post("/v1/death-registrations", json=body)
        assert response.status_code == 201, response.text
        events.append(response.json())
    await _published(pool, events)
    ids = [uuid.UUID(e["event_id"]) for e in events]
    kept = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE event_id = ANY($1::uuid[]) AND routing_facts IS NOT NULL", ids
    )
    assert kept == len(events)
    agency = _agency_name()
    onboarded.append(agency)
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")
    # Some of the deceased's details, part of the executor, none of the informant's.
    granted = ["date_of_death", "deceased", "executor.person", "nino"]
    await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="statutory",
        statute="a test statute",
        fields=granted,
        condition=None,
    )
    selection = Selection.of(references=[e["reference"] for e in events])

    async def run_replay() -> tuple[str, int]:
        started = await replay.start(
            pool, services, agency=agency, selection=selection, reason="tests", requested_by="tests"
        )
        replayer = replay.Replayer(services, pool, started)
        done = await replayer.run()
        assert done.tally.sent == len(events), done.tally
        return started.id, replayer.facts_used

    from_facts, facts_used = await run_replay()
    assert facts_used == len(events)
    await pool.execute("UPDATE outbox SET routing_facts = NULL WHERE event_id = ANY($1::uuid[])", ids)
    read_again, facts_used = await run_replay()
    assert facts_used == 0

    records = await read_topic(services, Topics(services.topic_prefix).agency(agency))

    def sent_by(replay_id: str) -> dict[str, tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        return {
            header(r, "ce_id") or "": (r.key, r.value, [h for h in r.headers if h[0] != REPLAY_ID_HEADER])
            for r in records
            if header(r, REPLAY_ID_HEADER) == replay_id
        }

    spliced = sent_by(from_facts)
    assert sorted(spliced) == sorted(e["event_id"] for e in events)
    assert spliced == sent_by(read_again)
    executors = []
    for _, value, _ in spliced.values():
        copy = decode(value or b"")[1]
        assert copy["envelope"]["informant"]["name"] is None and copy["last_address"] is None
        executors.append(copy["executor"])
    assert len([e for e in executors if e is not None]) == 2
    for kept_executor in (e for e in executors if e is not None):
        assert kept_executor["person"]["family_name"] == "Executor"
        assert kept_executor["relationship"] is None and kept_executor["nino"] is None
    # The SDK applies only what verifies: the office's signature over every disclosed item.
    async with _agency_consumer(services, pool, agency) as applied:

        async def all_applied() -> bool | None:
            return True if len(applied) == len(events) else None

        await eventually(all_applied, timeout=60, what="every copy applied by the agency's consumer")
    assert set(applied) == set(spliced)


@pytest.mark.integration
async def test_choosing_one_persons_events_to_replay_is_a_look_recorded_for_them(
    services: Settings, pool: asyncpg.Pool
) -> None:
    subject = f"n-{uuid.uuid4().hex}"
    code, output = await _tuo(
        services, "replay", "run", "hmrc", "--subject", subject, "--dry-run", "--reason", "x"
    )
    assert code == 1 and "say why you look" in output, output
    assert await looks.looks_at(pool, subject) == []
    why = "the person asked us to send their records again"
    code, output = await _tuo(
        services, "replay", "run", "hmrc", "--subject", subject, "--dry-run", "--reason", why, "--by", "sam"
    )
    assert code == 0, output
    [look] = await looks.looks_at(pool, subject)
    assert (look.who, look.action, look.reason, look.subject_ids) == (
        "sam",
        looks.Action.REPLAY,
        why,
        [subject],
    )
