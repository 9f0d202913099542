"""The whole path, against the real broker and database: HTTP intake → outbox →
relay → tuo.life-events → router → agency topics → agency consumers → receipts
→ status lookup."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from producers.accounts import issue_token
from router.minimise import event_fields
from runtime.kafka import Topics
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from schemas import CATALOGUE, decode
from tests.support import death_registration, eventually, header, random_nino, read_topic

pytestmark = pytest.mark.integration

# hmrc, dwp statutory; dvla by the informant's consent; council-leeds statutory for a Leeds address
ENTITLED_TO_DEATH = {"hmrc", "dwp", "dvla", "council-leeds", "ons"}


async def _status_when_settled(intake: httpx.AsyncClient, reference: str) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        response = await intake.get(f"/v1/events/{reference}")
        body: dict[str, Any] = response.json()
        delivered = [a for a in body.get("agencies", []) if a["decision"] == "delivered"]
        if body.get("agencies") and all(a["receipt"] for a in delivered):
            return body
        return None

    return await eventually(settled, timeout=60, what=f"receipts for {reference}")


async def test_death_registration_reaches_each_entitled_agency_with_a_receipt(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    response = await intake.post("/v1/death-registrations", json=death_registration())
    assert response.status_code == 201, response.text
    accepted = response.json()
    assert accepted["reference"].startswith("TUO-")

    status = await _status_when_settled(intake, accepted["reference"])
    by_agency = {a["agency"]: a for a in status["agencies"]}
    delivered = {name for name, a in by_agency.items() if a["decision"] == "delivered"}
    assert delivered == ENTITLED_TO_DEATH
    for agency in ENTITLED_TO_DEATH:
        assert by_agency[agency]["receipt"]["outcome"] == "applied", by_agency[agency]
    assert by_agency["hmrc"]["legal_basis"].startswith("statutory: ")
    assert by_agency["dvla"]["legal_basis"] == "consent"
    assert by_agency["hmpo"]["decision"] == "withheld_no_consent"
    assert by_agency["hmpo"]["receipt"] is None
    assert by_agency["council-bradford"]["decision"] == "withheld_no_subscription", "outside its area"

    topics = Topics(services.topic_prefix)
    event_id = accepted["event_id"]
    for agency in ENTITLED_TO_DEATH:
        on_topic = [
            r for r in await read_topic(services, topics.agency(agency)) if header(r, "ce_id") == event_id
        ]
        assert len(on_topic) == 1, f"{agency} got {len(on_topic)} copies"
        subject, record = decode(on_topic[0].value or b"")
        assert subject == "DeathRegisteredDisclosure", "agencies get the minimised form"
        assert header(on_topic[0], "ce_type") == "uk.gov.tellusonce.DeathRegistered"
        assert record["envelope"]["reference"] == accepted["reference"]
        receipts = [decode(r.value or b"")[1] for r in await read_topic(services, topics.receipts(agency))]
        assert any(str(r["event_id"]) == event_id and r["outcome"] == "APPLIED" for r in receipts)
    for agency in ("hmpo", "council-bradford"):
        leaked = [
            r for r in await read_topic(services, topics.agency(agency)) if header(r, "ce_id") == event_id
        ]
        assert leaked == [], f"{agency} must not receive this death registration"


async def test_messages_use_the_confluent_wire_format_and_cloudevents_headers(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    nino = random_nino()
    response = await intake.post(
        "/v1/death-registrations",
        json=death_registration(deceased={"given_names": "Lee", "family_name": "Wire", "nino": nino}),
    )
    accepted = response.json()
    await _status_when_settled(intake, accepted["reference"])
    [message] = [
        r
        for r in await read_topic(services, Topics(services.topic_prefix).agency("dwp"))
        if header(r, "ce_id") == accepted["event_id"]
    ]
    assert message.value is not None
    assert message.value[0] == 0, "magic byte"
    disclosure = CATALOGUE.latest("DeathRegisteredDisclosure").schema_id
    assert int.from_bytes(message.value[1:5], "big") == disclosure, "DeathRegisteredDisclosure's schema id"
    assert header(message, "ce_specversion") == "1.0"
    assert header(message, "ce_type") == "uk.gov.tellusonce.DeathRegistered"
    assert header(message, "content-type") == "application/avro"
    # The key is the pseudonymous subject id (keyed hash of the NINO), never the NINO itself.
    assert message.key is not None and nino.encode() not in message.key
    assert message.key.decode() == subject_id_for(nino, services.require_pseudonym_key())
    assert decode(message.value)[1]["envelope"]["subject"]["subject_id"] == message.key.decode()


async def test_each_agency_receives_only_its_subscribed_fields_and_is_told_what_was_withheld(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    nino = random_nino()
    body = death_registration(
        deceased={"given_names": "Min", "family_name": "Imised", "nino": nino, "date_of_birth": "1950-01-01"},
        surviving_partner={"given_names": "Part", "family_name": "Ner", "relationship": "husband"},
        executor={"given_names": "Ex", "family_name": "Ecutor", "relationship": "solicitor"},
    )
    accepted = (await intake.post("/v1/death-registrations", json=body)).json()
    await _status_when_settled(intake, accepted["reference"])
    topics = Topics(services.topic_prefix)

    async def copy_for(agency: str) -> dict[str, Any]:
        [message] = [
            r
            for r in await read_topic(services, topics.agency(agency))
            if header(r, "ce_id") == accepted["event_id"]
        ]
        return decode(message.value or b"")[1]

    dvla = await copy_for("dvla")  # deceased, date_of_death, last_address
    assert dvla["deceased"]["family_name"] == "Imised" and dvla["last_address"]["postcode"] == "LS1 1AA"
    assert dvla["surviving_partner"] is None and dvla["executor"] is None and dvla["place_of_death"] is None
    assert dvla["envelope"]["subject"]["nino"] is None, "no NINO for an agency not granted it"
    assert dvla["envelope"]["informant"] == {"name": None, "relationship": None}, "nor the informant"
    assert dvla["envelope"]["provenance"]["recorded_by"] is None, "nor who recorded it"
    assert dvla["withheld_fields"] == sorted(
        event_fields("DeathRegistered") - {"deceased", "date_of_death", "last_address"}
    )
    dwp = await copy_for("dwp")
    assert dwp["envelope"]["subject"]["nino"] == nino
    partner = dwp["surviving_partner"]
    assert partner["person"]["family_name"] == "Ner", "granted surviving_partner.person"
    assert partner["relationship"] is None and partner["address"] is None, "not granted"
    assert dwp["executor"]["person"]["family_name"] == "Ecutor" and dwp["executor"]["relationship"] is None
    assert "surviving_partner.relationship" in dwp["withheld_fields"]
    assert "next_of_kin.person" in dwp["withheld_fields"] and "informant.name" in dwp["withheld_fields"]
    council = await copy_for("council-leeds")
    assert council["executor"] is None and "executor.person" in council["withheld_fields"]


async def test_withdrawn_consent_stops_delivery_to_that_agency(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    nino = random_nino()
    first = await intake.post(
        "/v1/death-registrations",
        json=death_registration(deceased={"given_names": "Kim", "family_name": "Consent", "nino": nino}),
    )
    first_status = await _status_when_settled(intake, first.json()["reference"])
    assert {a["agency"]: a["decision"] for a in first_status["agencies"]}["dvla"] == "delivered"

    subject_id = await pool.fetchval(
        "SELECT subject_id FROM intake_record WHERE reference = $1", first.json()["reference"]
    )
    await pool.execute(
        "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
        " VALUES ($1, 'dvla', 'DeathRegistered', 'withdrawn', 'citizen')",
        subject_id,
    )
    # The registration is voided and made again for the same person, with no new consent
    # given (a second death for the same NINO is refused while the first stands).
    supervisor = await issue_token(pool, "leeds", "supervisor", "end-to-end supervisor")
    voided = await intake.post(
        f"/v1/events/{first.json()['reference']}/void",
        json={"reason": "registered in error"},
        headers={"Authorization": f"Bearer {supervisor}"},
    )
    assert voided.status_code == 201, voided.text
    second = await intake.post(
        "/v1/death-registrations",
        json=death_registration(
            deceased={"given_names": "Kim", "family_name": "Consent", "nino": nino}, consents=[]
        ),
    )
    assert second.status_code == 201, second.text
    second_status = await _status_when_settled(intake, second.json()["reference"])
    decisions = {a["agency"]: a["decision"] for a in second_status["agencies"]}
    assert decisions["dvla"] == "withheld_no_consent"
    assert decisions["dwp"] == "delivered"
    dvla_ids = {
        header(r, "ce_id") for r in await read_topic(services, Topics(services.topic_prefix).agency("dvla"))
    }
    assert second.json()["event_id"] not in dvla_ids


CE_HEADERS = {
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
    "content-type",
    "ce_dataschema",
}


async def test_every_message_the_bus_writes_carries_full_cloudevents_headers(
    intake: httpx.AsyncClient, services: Settings
) -> None:
    accepted = (await intake.post("/v1/death-registrations", json=death_registration())).json()
    await _status_when_settled(intake, accepted["reference"])
    topics = Topics(services.topic_prefix)
    event_id = accepted["event_id"]
    written = {
        "life event": [
            r for r in await read_topic(services, topics.life_events) if header(r, "ce_id") == event_id
        ],
        "agency copy": [
            r for r in await read_topic(services, topics.agency("dwp")) if header(r, "ce_id") == event_id
        ],
        "decision": [
            r
            for r in await read_topic(services, topics.routing_decisions)
            if header(r, "ce_id") == f"{event_id}/dwp"
        ],
        "receipt": [
            r
            for r in await read_topic(services, topics.receipts("dwp"))
            if (header(r, "ce_id") or "").startswith(f"{event_id}/dwp/")
        ],
    }
    for kind, records in written.items():
        assert records, f"no {kind} message for {event_id}"
        for record in records:
            names = {key for key, _ in record.headers}
            assert CE_HEADERS <= names, f"{kind} lacks {CE_HEADERS - names}"
            schema_id = int.from_bytes((record.value or b"")[1:5], "big")
            assert (header(record, "ce_dataschema") or "").endswith(f"/schemas/ids/{schema_id}")
            assert header(record, "ce_subject") == (record.key or b"").decode()


async def test_an_area_condition_looks_at_the_subjects_address_not_the_executors(
    intake: httpx.AsyncClient,
) -> None:
    body = death_registration(
        last_address={"lines": ["9 Bradford Road"], "town": "Bradford", "postcode": "BD1 1HY"},
        executor={
            "given_names": "Ex",
            "family_name": "Ecutor",
            "relationship": "solicitor",
            "address": {"lines": ["1 Leeds Street"], "town": "Leeds", "postcode": "LS1 1AA"},
        },
    )
    accepted = (await intake.post("/v1/death-registrations", json=body)).json()
    status = await _status_when_settled(intake, accepted["reference"])
    decisions = {a["agency"]: a["decision"] for a in status["agencies"]}
    assert decisions["council-bradford"] == "delivered"
    assert decisions["council-leeds"] == "withheld_no_subscription", (
        "the executor's Leeds address does not count"
    )
