"""Bad input at the intake endpoint gets a clear error naming the field, and
nothing is written: no intake record, no outbox row, no Kafka message."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.structs import TopicPartition

from runtime.kafka import Topics
from runtime.settings import Settings
from tests.support import (
    death_registration,
    eventually,
    header,
    inspector_consumer,
    random_nino,
    read_topic,
    today,
)

pytestmark = pytest.mark.integration


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


BAD_BODIES: list[tuple[str, Any, str, str]] = [
    # (case, body, field named in the error, words in the message)
    ("missing date of death", _without(death_registration(), "date_of_death"), "date_of_death", "required"),
    ("missing informant", _without(death_registration(), "informant"), "informant", "required"),
    ("date of death is a number", death_registration(date_of_death=12345), "date_of_death", "date"),
    ("date of death is words", death_registration(date_of_death="last Tuesday"), "date_of_death", "date"),
    (
        "address lines is a string",
        death_registration(last_address={"lines": "1 Street", "town": "Leeds", "postcode": "LS1 1AA"}),
        "last_address.lines",
        "list",
    ),
    (
        "date of death in the future",
        death_registration(date_of_death=(today() + timedelta(days=2)).isoformat()),
        "date_of_death",
        "future",
    ),
    (
        "death before birth",
        death_registration(date_of_death="1930-01-01"),
        "date_of_death",
        "before the deceased's date of birth",
    ),
    (
        "bad NINO",
        death_registration(deceased={"given_names": "A", "family_name": "B", "nino": "123"}),
        "deceased.nino",
        "National Insurance number",
    ),
    (
        "bad postcode",
        death_registration(last_address={"lines": ["1 Street"], "town": "Leeds", "postcode": "NOT A CODE"}),
        "last_address.postcode",
        "UK postcode",
    ),
    ("unknown field", death_registration(favourite_colour="blue"), "favourite_colour", "not permitted"),
    (
        "control characters in a name",
        death_registration(deceased={"given_names": "Pat\x00\x1b[31m", "family_name": "Example"}),
        "deceased.given_names",
        "control characters",
    ),
    (
        "very long name",
        death_registration(deceased={"given_names": "A" * 5000, "family_name": "Example"}),
        "deceased.given_names",
        "at most 200",
    ),
    ("channel outside the list", death_registration(channel="carrier pigeon"), "channel", "desk"),
    (
        "consent to an agency that does not take it",
        death_registration(consents=[{"agency": "hmrc", "choice": "given"}]),
        "consents.0.agency",
        "does not receive DeathRegistered on consent",
    ),
    (
        "the same agency twice in consents",
        death_registration(consents=[{"agency": "dvla", "choice": "given"}] * 2),
        "consents",
        "more than once",
    ),
    ("a JSON array", [death_registration()], "(request body)", "dictionary"),
    ("no body at all", None, "(request body)", "required"),
]


async def _written(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM intake_record) AS records,"
        " (SELECT count(*) FROM outbox) AS outbox,"
        " (SELECT count(*) FROM consent_record) AS consents"
    )
    assert row is not None
    return row["records"], row["outbox"], row["consents"]


async def _life_events_end(settings: Settings) -> int:
    topic = Topics(settings.topic_prefix).life_events
    consumer = inspector_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.life_events_partitions)]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def _problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("case", "body", "field", "words"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_invalid_submission_is_refused_naming_the_field_and_nothing_is_written(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, case: str, body: Any, field: str, words: str
) -> None:
    before = await _written(pool)
    response = await intake.post("/v1/death-registrations", json=body)
    assert response.status_code == 422, response.text
    problem = _problem(response)
    assert problem["status"] == 422
    named = {e["field"]: e["message"] for e in problem["errors"]}
    assert field in named, f"{case}: expected an error for {field}, got {named}"
    assert words in named[field], f"{case}: {named[field]!r} should mention {words!r}"
    assert await _written(pool) == before


async def test_malformed_json_is_refused_and_nothing_reaches_postgres_or_kafka(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    before_db, before_kafka = await _written(pool), await _life_events_end(services)
    for raw in (b'{"informant": ', b"\xff\xfe not utf-8", b"", b"{" * 10_000, b"null", b'"text"'):
        response = await intake.post(
            "/v1/death-registrations", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, raw[:20]
        assert _problem(response)["errors"][0]["field"] == "(request body)"
    assert await _written(pool) == before_db
    assert await _life_events_end(services) == before_kafka


# Every JSON endpoint of the API; a reference in the right shape that no office recorded.
JSON_ENDPOINTS = [
    "/v1/death-registrations",
    "/v1/birth-registrations",
    "/v1/address-changes",
    "/v1/events/TUO-2026-0000-0000/corrections",
    "/v1/events/TUO-2026-0000-0000/void",
]
NOT_UTF8 = [
    b'{"informant": {"name": "Ren\xe9e Example"}}',  # Latin-1, as an old system might send it
    b'{"reason": "\xc3\x28"}',  # a broken two-byte sequence
    b"\x80\x81\x82",  # continuation bytes with nothing to continue
    b'{"reason": "ok"}\xf8',  # a byte UTF-8 never uses, after valid JSON
]


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS)
async def test_a_body_that_is_not_utf8_gets_a_400_problem_and_nothing_is_written(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, endpoint: str
) -> None:
    before = await _written(pool)
    for raw in NOT_UTF8:
        response = await intake.post(endpoint, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, (endpoint, raw, response.text)
        problem = _problem(response)
        assert problem["status"] == 400 and problem["title"] == "The request body is not valid UTF-8"
        assert problem["errors"] == [{"field": "(request body)", "message": "is not valid UTF-8"}]
        assert "detail" in problem and "error parsing" not in problem["detail"]
    assert await _written(pool) == before


async def test_a_refusal_from_the_framework_itself_is_a_problem_too(intake: httpx.AsyncClient) -> None:
    response = await intake.delete("/v1/death-registrations")
    assert response.status_code == 405
    assert _problem(response)["title"] == "Method Not Allowed"
    assert response.headers["allow"] == "POST"


async def test_oversized_submission_is_refused_with_413(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    before = await _written(pool)
    huge = json.dumps(death_registration(place_of_death="x" * (services.max_request_bytes + 1)))
    declared = await intake.post(
        "/v1/death-registrations", content=huge, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert "limited to" in _problem(declared)["detail"]

    async def chunks() -> Any:  # no Content-Length: the limit must hold on the stream too
        for start in range(0, len(huge), 4096):
            yield huge[start : start + 4096].encode()

    streamed = await intake.post(
        "/v1/death-registrations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert await _written(pool) == before


async def test_same_idempotency_key_twice_gives_one_event_and_the_same_reference(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = death_registration(deceased={"given_names": "Ida", "family_name": "Twice", "nino": random_nino()})
    key = {"Idempotency-Key": "desk-7-" + random_nino()}
    first = await intake.post("/v1/death-registrations", json=body, headers=key)
    second = await intake.post("/v1/death-registrations", json=body, headers=key)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["reference"] == second.json()["reference"]
    count = await pool.fetchval(
        "SELECT count(*) FROM outbox o JOIN intake_record i USING (event_id) WHERE i.reference = $1",
        first.json()["reference"],
    )
    assert count == 1

    changed = await intake.post(
        "/v1/death-registrations", json={**body, "place_of_death": "Elsewhere"}, headers=key
    )
    assert changed.status_code == 409
    assert "different request" in _problem(changed)["detail"]


async def test_status_of_an_unknown_or_hostile_reference_is_a_plain_404(intake: httpx.AsyncClient) -> None:
    for reference in ("TUO-2026-0000-0000", "' OR 1=1 --", "x" * 500, "%00"):
        response = await intake.get(f"/v1/events/{reference}")
        assert response.status_code == 404, reference
        assert _problem(response)["title"] == "No such event"


async def test_accepted_event_is_published_to_life_events(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    """The counterpart of the refusals above: a valid event does reach Kafka."""
    response = await intake.post("/v1/death-registrations", json=death_registration())
    assert response.status_code == 201
    event_id = response.json()["event_id"]

    async def published() -> bool:
        records = await read_topic(services, Topics(services.topic_prefix).life_events)
        return [header(r, "ce_id") for r in records].count(event_id) == 1

    await eventually(published, what="the event, once, on tuo.life-events")


async def test_overlong_idempotency_key_is_refused_naming_the_header(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    before = await _written(pool)
    response = await intake.post(
        "/v1/death-registrations", json=death_registration(), headers={"Idempotency-Key": "k" * 500}
    )
    assert response.status_code == 422
    assert _problem(response)["errors"] == [
        {"field": "Idempotency-Key", "message": "String should have at most 200 characters"}
    ]
    assert await _written(pool) == before
