"""Corrections and voids go to exactly the agencies that received the original
event, within the fields each received, and to no one else."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from runtime.kafka import Topics
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from schemas import decode, encode
from schemas.cloudevents import headers_for
from schemas.signatures import office_source, signature_headers
from tests.golden.make_vectors import ENVELOPE
from tests.support import (
    death_registration,
    eventually,
    header,
    inspector_producer,
    office_key,
    random_nino,
    read_topic,
)

pytestmark = pytest.mark.integration


async def _settled(intake: httpx.AsyncClient, reference: str) -> dict[str, str]:
    async def decided() -> dict[str, str] | None:
        status = (await intake.get(f"/v1/events/{reference}")).json()
        delivered = [a for a in status["agencies"] if a["decision"] == "delivered"]
        if status["agencies"] and all(a["receipt"] for a in delivered):
            return {a["agency"]: a["decision"] for a in status["agencies"]}
        return None

    return await eventually(decided, timeout=60, what=f"decisions for {reference}")


async def _publish(
    settings: Settings, pool: asyncpg.Pool, name: str, body: dict[str, Any], subject_id: str
) -> str:
    """Publish a correction or void straight to the bus, signed by the Leeds office."""
    key = await office_key(pool, settings, "leeds")
    event_id = str(uuid.uuid4())
    record = {
        "envelope": {
            **ENVELOPE,
            "event_id": event_id,
            "subject": {"subject_id": subject_id, "nino": "AB123456C"},
            "registration_office": key.office,
        },
        **body,
    }
    value = encode(name, record)
    producer = inspector_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(
            Topics(settings.topic_prefix).life_events,
            value,
            key=subject_id.encode(),
            headers=headers_for(
                value,
                id=event_id,
                source=office_source(key.office),
                subject=subject_id,
                time=datetime.now(UTC),
                schema_base_url=settings.schema_base_url(),
            )
            + signature_headers(key, name, record, event_id),
        )
    finally:
        await producer.stop()
    return event_id


async def _received_by(settings: Settings, event_id: str) -> dict[str, dict[str, Any]]:
    topics = Topics(settings.topic_prefix)
    found = {}
    for agency in ("hmrc", "dwp", "dvla", "hmpo", "council-leeds", "council-bradford", "ons"):
        for record in await read_topic(settings, topics.agency(agency)):
            if header(record, "ce_id") == event_id:
                found[agency] = decode(record.value or b"")[1]
    return found


async def test_correction_and_void_reach_exactly_the_original_recipients(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    nino = random_nino()
    body = death_registration(deceased={"given_names": "Cor", "family_name": "Rected", "nino": nino})
    original = (await intake.post("/v1/death-registrations", json=body)).json()
    subject_id = subject_id_for(nino, services.require_pseudonym_key())

    async def published() -> bool:  # on the topic, but not necessarily decided yet
        records = await read_topic(services, Topics(services.topic_prefix).life_events)
        return any(header(r, "ce_id") == original["event_id"] for r in records)

    await eventually(published, what="the original on tuo.life-events")

    correction_id = await _publish(
        services,
        pool,
        "EventCorrected",
        {
            "corrects_event_id": original["event_id"],
            "corrects_reference": original["reference"],
            "corrected_event_type": "DeathRegistered",
            "changes": [
                {"field": "deceased.date_of_birth", "new_value_json": '"1941-03-12"'},
                {"field": "executor.person.family_name", "new_value_json": '"Smith"'},
            ],
            "reason": "misread certificate",
        },
        subject_id,
    )

    async def corrected() -> dict[str, dict[str, Any]] | None:
        found = await _received_by(services, correction_id)
        return found if len(found) >= 5 else None

    # Sent before the original's decisions were (necessarily) recorded: the router waits for them.
    decisions = await _settled(intake, original["reference"])
    recipients = {agency for agency, decision in decisions.items() if decision == "delivered"}
    assert recipients == {"hmrc", "dwp", "dvla", "council-leeds", "ons"}
    copies = await eventually(corrected, timeout=60, what="the correction at every original recipient")
    assert copies["hmrc"]["envelope"]["subject"]["nino"] == "AB123456C", "hmrc is granted the NINO"
    assert copies["dvla"]["envelope"]["subject"]["nino"] is None, "dvla is not"
    assert set(copies) == recipients, "a correction goes to the original's recipients and no one else"
    assert [c["field"] for c in copies["hmrc"]["changes"]] == [
        "deceased.date_of_birth",
        "executor.person.family_name",
    ]
    assert [c["field"] for c in copies["dvla"]["changes"]] == ["deceased.date_of_birth"], (
        "dvla never had the executor"
    )
    # Published by hand here, so without the derived facts intake would have corrected too.
    assert copies["ons"]["changes"] == [], "the statistics office has neither field"

    void_id = await _publish(
        services,
        pool,
        "EventVoided",
        {
            "voids_event_id": original["event_id"],
            "voids_reference": original["reference"],
            "voided_event_type": "DeathRegistered",
            "reason": "registered in error",
        },
        subject_id,
    )

    async def voided() -> dict[str, dict[str, Any]] | None:
        found = await _received_by(services, void_id)
        return found if set(found) >= recipients else None

    voids = await eventually(voided, timeout=60, what="the void at every original recipient")
    assert set(voids) == recipients
    assert voids["council-leeds"]["envelope"]["subject"]["nino"] is None


async def test_a_correction_that_misnames_its_original_is_dead_lettered(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    nino = random_nino()
    body = death_registration(deceased={"given_names": "Mis", "family_name": "Named", "nino": nino})
    original = (await intake.post("/v1/death-registrations", json=body)).json()
    await _settled(intake, original["reference"])
    correction_id = await _publish(
        services,
        pool,
        "EventCorrected",
        {
            "corrects_event_id": original["event_id"],
            "corrects_reference": original["reference"],
            "corrected_event_type": "BirthRegistered",  # it was a death
            "changes": [{"field": "child.date_of_birth", "new_value_json": '"2026-01-01"'}],
            "reason": "wrong",
        },
        subject_id_for(nino, services.require_pseudonym_key()),
    )

    async def dead_lettered() -> str | None:
        for record in await read_topic(services, Topics(services.topic_prefix).dead_letters):
            if header(record, "ce_id") == correction_id:
                return header(record, "tuo_dlq_reason")
        return None

    reason = await eventually(dead_lettered, timeout=60, what="the misnamed correction in dead letters")
    assert "names the original as BirthRegistered" in reason
    assert await _received_by(services, correction_id) == {}
