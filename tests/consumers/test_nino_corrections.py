"""Correcting the subject's NINO: the registration moves to the right person's
pseudonymous subject id. Agencies granted the NINO learn the new one; every
recipient learns the old→new subject id link for that registration only; the
citizen pages follow the registration to its new owner and away from the old."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.structs import ConsumerRecord

from citizens.data_tracker import everything, received
from consumers.agencies import records
from runtime.kafka import Topics
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from schemas import decode, models
from tests.support import death_registration, eventually, header, random_nino, read_topic, today

pytestmark = pytest.mark.integration

HOME = models.Address(lines=["9 Mistaken Row"], town="Leeds", postcode="LS1 1AA")


async def _final_receipts(intake: httpx.AsyncClient, reference: str) -> dict[str, dict[str, Any]]:
    """Each agency's row in the event's status, once every delivered copy has a final receipt."""

    async def settled() -> dict[str, dict[str, Any]] | None:
        status = (await intake.get(f"/v1/events/{reference}")).json()
        rows = {row["agency"]: row for row in status["agencies"]}
        delivered = [row for row in rows.values() if row["decision"] == "delivered"]
        final = all(row["receipt"] and row["receipt"]["outcome"] != "received" for row in delivered)
        return rows if delivered and final else None

    return await eventually(settled, timeout=90, what=f"final receipts for {reference}")


async def _copy(settings: Settings, agency: str, event_id: str) -> ConsumerRecord[bytes, bytes]:
    async def found() -> ConsumerRecord[bytes, bytes] | None:
        topic = Topics(settings.topic_prefix).agency(agency)
        return next((r for r in await read_topic(settings, topic) if header(r, "ce_id") == event_id), None)

    return await eventually(found, timeout=60, what=f"{event_id} at {agency}")


async def _tax_record(pool: asyncpg.Pool, nino: str) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT status, closed_on, closed_by_event FROM agency.tax_record WHERE nino = $1", nino
    )


async def _award(pool: asyncpg.Pool, nino: str) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT status, stopped_on, overpayment_pence FROM agency.pension_award WHERE nino = $1", nino
    )


async def _written(pool: asyncpg.Pool) -> tuple[int, int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM intake_record"),
        await pool.fetchval("SELECT count(*) FROM outbox"),
        await pool.fetchval("SELECT count(*) FROM subject_link"),
    )


async def test_a_death_registered_with_the_wrong_nino_moves_to_the_right_person(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    key = services.require_pseudonym_key()
    wrong, right = random_nino(), random_nino()  # wrong: a living taxpayer's, given in error
    old_id, new_id = subject_id_for(wrong, key), subject_id_for(right, key)
    living = models.Person(given_names="Sam", family_name=f"Alive{uuid.uuid4().hex[:6]}")
    deceased = models.Person(given_names="Lou", family_name=f"Gone{uuid.uuid4().hex[:6]}")
    await records.open_tax_record(pool, wrong, living, HOME)
    await records.open_tax_record(pool, right, deceased, HOME)
    await records.award_pension(pool, wrong, 21_000, today())
    await records.award_pension(pool, right, 14_000, today())

    # The living person's own move stays theirs whatever happens to the death.
    move = {
        "informant": {"name": "Sam", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": living.given_names, "family_name": living.family_name, "nino": wrong},
        "old_address": {"lines": ["1 Before Street"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {"lines": ["9 Mistaken Row"], "town": "Leeds", "postcode": "LS1 1AA"},
        "effective_date": "2026-01-05",
        "consents": [],
    }
    own = await intake.post("/v1/address-changes", json=move)
    assert own.status_code == 201, own.text

    died_on: date = today() - timedelta(days=3)
    death = death_registration(
        deceased={**deceased.model_dump(mode="json"), "nino": wrong}, date_of_death=died_on.isoformat()
    )
    original = (await intake.post("/v1/death-registrations", json=death)).json()
    first = await _final_receipts(intake, original["reference"])
    assert first["hmrc"]["receipt"]["outcome"] == first["dwp"]["receipt"]["outcome"] == "applied"
    assert (await _tax_record(pool, wrong))["status"] == "closed", "the wrong taxpayer was closed"
    assert (await _award(pool, wrong))["status"] == "stopped", "and their pension stopped"

    fix = {
        "changes": [{"field": "nino", "value": right[:2].lower() + " " + right[2:]}],
        "reason": "NINO misread from the medical certificate",
    }
    retry = {"Idempotency-Key": f"nino-{uuid.uuid4()}"}
    response = await intake.post(f"/v1/events/{original['reference']}/corrections", json=fix, headers=retry)
    assert response.status_code == 201, response.text
    correction = response.json()
    before = await _written(pool)
    again = await intake.post(f"/v1/events/{original['reference']}/corrections", json=fix, headers=retry)
    assert (again.status_code, again.json()["reference"]) == (200, correction["reference"]), again.text
    assert await _written(pool) == before, "a retried correction records nothing more"

    at_hmrc = await _copy(services, "hmrc", correction["event_id"])
    copy = decode(at_hmrc.value or b"")[1]
    assert at_hmrc.key == old_id.encode(), "keyed like the original, so it follows it in order"
    assert [(c["field"], c["new_value_json"]) for c in copy["changes"]] == [("nino", f'"{right}"')]
    assert (copy["previous_subject_id"], copy["new_subject_id"]) == (old_id, new_id)
    assert copy["envelope"]["subject"] == {"subject_id": old_id, "nino": wrong}

    at_dvla = await _copy(services, "dvla", correction["event_id"])
    dvla_copy = decode(at_dvla.value or b"")[1]
    assert dvla_copy["changes"] == [] and dvla_copy["envelope"]["subject"]["nino"] is None
    assert (dvla_copy["previous_subject_id"], dvla_copy["new_subject_id"]) == (old_id, new_id)
    everything_dvla_got = (at_dvla.value or b"") + b"".join(v for _, v in at_dvla.headers)
    assert right.encode() not in everything_dvla_got, "dvla is not granted the NINO"

    receipts = await _final_receipts(intake, correction["reference"])
    assert receipts["hmrc"]["receipt"]["outcome"] == "applied", receipts["hmrc"]
    reopened, closed = await _tax_record(pool, wrong), await _tax_record(pool, right)
    assert (reopened["status"], reopened["closed_on"]) == ("open", None), "the living taxpayer is reopened"
    assert (closed["status"], closed["closed_on"]) == ("closed", died_on)
    assert closed["closed_by_event"] == uuid.UUID(original["event_id"])
    assert receipts["dwp"]["receipt"]["outcome"] == "applied", receipts["dwp"]
    resumed, stopped = await _award(pool, wrong), await _award(pool, right)
    assert (resumed["status"], resumed["overpayment_pence"]) == ("in_payment", 0)
    assert (stopped["status"], stopped["stopped_on"]) == ("stopped", died_on)
    assert stopped["overpayment_pence"] == 14_000 * 3 // 7, "paid for the three days after the death"

    # The right person's pages show the death and its correction; the wrong NINO's
    # holder sees neither any more, and keeps their own move, which the other never sees.
    theirs = await received(pool, new_id, None)
    assert [e.event_type for e in theirs] == ["EventCorrected", "DeathRegistered"]
    wrong_holders = await received(pool, old_id, None)
    assert [e.event_type for e in wrong_holders] == ["AddressChanged"]
    download = await everything(pool, new_id, None)  # the citizen's "download my data"
    assert sorted(e["event_type"] for e in download["events"]) == ["DeathRegistered", "EventCorrected"]

    # A later correction still reaches HMRC with the right NINO, never the wrong one again.
    later = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={"changes": [{"field": "place_of_death", "value": "Home"}], "reason": "place misheard"},
    )
    assert later.status_code == 201, later.text
    later_copy = decode((await _copy(services, "hmrc", later.json()["event_id"])).value or b"")[1]
    assert later_copy["envelope"]["subject"]["nino"] == right
    assert later_copy["new_subject_id"] is None
    now_theirs = [e.event_type for e in await received(pool, new_id, None)]
    assert sorted(now_theirs) == ["DeathRegistered", "EventCorrected", "EventCorrected"]
    assert [e.event_type for e in await received(pool, old_id, None)] == ["AddressChanged"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"field": "nino", "value": "123"}, "National Insurance number"),
        ({"field": "nino", "value": "QQ 12 34 56 C" * 50}, "at most"),
        ({"field": "nino", "value": 123456}, "string"),
        ({"field": "nino", "value": "<x>1</x>"}, "National Insurance number"),
        ({"field": "nino", "value": "(the one recorded, in lower case)"}, "already recorded"),
        ({"field": "deceased.nino", "value": "CE123456A"}, "the field nino"),
        ({"field": "envelope.subject.nino", "value": "CE123456A"}, "cannot be corrected"),
    ],
)
async def test_a_bad_nino_correction_is_refused_and_nothing_is_written(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, change: dict[str, Any], words: str
) -> None:
    nino = random_nino()  # its own person: a second death of one NINO is refused as a duplicate
    body = death_registration(deceased={"given_names": "Pat", "family_name": "Example", "nino": nino})
    reference = (await intake.post("/v1/death-registrations", json=body)).json()["reference"]
    if change["value"] == "(the one recorded, in lower case)":
        change = {**change, "value": nino.lower()}
    before = await _written(pool)
    response = await intake.post(
        f"/v1/events/{reference}/corrections", json={"changes": [change], "reason": "testing"}
    )
    assert response.status_code == 422, response.text
    assert words.lower() in response.text.lower()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await _written(pool) == before


async def test_the_nino_corrected_twice_in_one_request_is_refused(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    before = await _written(pool)
    twice = [{"field": "nino", "value": random_nino()}, {"field": "nino", "value": random_nino()}]
    response = await intake.post(
        f"/v1/events/{reference}/corrections", json={"changes": twice, "reason": "testing"}
    )
    assert response.status_code == 422
    assert "more than once" in response.text
    assert await _written(pool) == before


async def test_two_nino_corrections_at_once_leave_one_unbroken_chain_of_links(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    first = random_nino()
    body = death_registration(deceased={"given_names": "Two", "family_name": "Desks", "nino": first})
    original = (await intake.post("/v1/death-registrations", json=body)).json()
    answers = await asyncio.gather(
        *(
            intake.post(
                f"/v1/events/{original['reference']}/corrections",
                json={"changes": [{"field": "nino", "value": random_nino()}], "reason": "two desks at once"},
            )
            for _ in range(2)
        )
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses in ([201, 201], [201, 422]), [a.text for a in answers]
    if statuses == [201, 422]:
        assert "corrected meanwhile" in next(a.text for a in answers if a.status_code == 422)
    links = await pool.fetch(
        "SELECT previous_subject_id, new_subject_id FROM subject_link"
        " WHERE corrected_event_id = $1 ORDER BY id",
        uuid.UUID(original["event_id"]),
    )
    assert len(links) == statuses.count(201)
    expected = subject_id_for(first, services.require_pseudonym_key())
    for link in links:  # each link starts where the one before it ended
        assert link["previous_subject_id"] == expected
        expected = link["new_subject_id"]
