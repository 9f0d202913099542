"""The intake API's front door: bearer tokens bound to an office, roles, content
types, and corrections and voids of recorded events, against the real bus."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from operators.services import RunningBus
from producers.accept import Intake
from producers.accounts import issue_token
from producers.intake import PROBLEM_HANDLERS, api
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode
from tests.support import death_registration, eventually, header, random_nino, read_topic

pytestmark = pytest.mark.integration


async def _written(pool: asyncpg.Pool) -> tuple[int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM intake_record"),
        await pool.fetchval("SELECT count(*) FROM outbox"),
    )


def _client(bus: RunningBus, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10, headers=headers)


@pytest.fixture(scope="module")
async def supervisor_token(pool: asyncpg.Pool) -> str:
    return await issue_token(pool, "leeds", "supervisor", "test supervisor system")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer tuo_not-a-real-token",
        "Bearer " + "x" * 5000,
        "Basic dXNlcjpwYXNz",
        "Bearer tuo_' OR 1=1 --",
    ],
    ids=["none", "empty", "unknown", "huge", "basic", "sql"],
)
async def test_api_without_a_current_token_is_refused_with_401_and_writes_nothing(
    bus: RunningBus, pool: asyncpg.Pool, authorization: str | None
) -> None:
    before = await _written(pool)
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with _client(bus, None) as client:
        response = await client.post("/v1/death-registrations", json=death_registration(), headers=headers)
        status = await client.get("/v1/events/TUO-2026-ABCD-EFGH", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert status.status_code == 401
    assert await _written(pool) == before


async def test_expired_or_revoked_token_is_refused(bus: RunningBus, pool: asyncpg.Pool) -> None:
    expired = await issue_token(pool, "leeds", "registrar", "expired client", timedelta(seconds=-1))
    revoked = await issue_token(pool, "leeds", "registrar", "revoked client")
    await pool.execute("UPDATE api_token SET revoked_at = now() WHERE label = 'revoked client'")
    for token in (expired, revoked):
        async with _client(bus, token) as client:
            response = await client.post("/v1/death-registrations", json=death_registration())
        assert response.status_code == 401


async def test_event_is_recorded_for_the_tokens_office_and_signed_by_it(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await intake.post("/v1/death-registrations", json=death_registration())
    assert response.status_code == 201
    row = await pool.fetchrow(
        "SELECT registration_office, recorded_by FROM intake_record WHERE reference = $1",
        response.json()["reference"],
    )
    assert dict(row) == {"registration_office": "leeds", "recorded_by": "api:test client"}


async def test_submitting_for_another_office_is_refused(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    before = await _written(pool)
    response = await intake.post(
        "/v1/death-registrations", json=death_registration(registration_office="bradford")
    )
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "registration_office", "message": "is not the office your credentials are for"}
    ]
    assert await _written(pool) == before


async def test_another_office_cannot_see_an_events_status(
    intake: httpx.AsyncClient, bus: RunningBus, pool: asyncpg.Pool
) -> None:
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    bradford = await issue_token(pool, "bradford", "supervisor", "bradford system")
    async with _client(bus, bradford) as client:
        seen = await client.get(f"/v1/events/{reference}")
        voided = await client.post(f"/v1/events/{reference}/void", json={"reason": "testing"})
    assert seen.status_code == 404, "an office sees only its own events"
    assert voided.status_code == 404
    assert (await intake.get(f"/v1/events/{reference}")).status_code == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"a": 1}'),
        ("application/x-www-form-urlencoded", b"a=1"),
        ("multipart/form-data; boundary=x", b"--x--"),
        ("application/xml", b"<death/>"),
        (None, b'{"a": 1}'),
    ],
)
async def test_a_body_that_is_not_json_is_refused_with_415(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, content_type: str | None, body: bytes
) -> None:
    before = await _written(pool)
    headers = {"Content-Type": content_type} if content_type else {}
    request = intake.build_request("POST", "/v1/death-registrations", content=body, headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)
    response = await intake.send(request)
    assert response.status_code == 415, response.text
    assert response.json()["title"] == "Unsupported content type"
    assert await _written(pool) == before


async def _received(settings: Settings, agency: str, event_id: str) -> dict[str, Any] | None:
    for record in await read_topic(settings, Topics(settings.topic_prefix).agency(agency)):
        if header(record, "ce_id") == event_id:
            return decode(record.value or b"")[1]
    return None


async def test_a_correction_over_the_api_reaches_the_original_recipients(
    intake: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    nino = random_nino()
    body = death_registration(deceased={"given_names": "Cor", "family_name": "Rected", "nino": nino})
    original = (await intake.post("/v1/death-registrations", json=body)).json()
    response = await intake.post(
        f"/v1/events/{original['reference']}/corrections",
        json={
            "changes": [{"field": "deceased.date_of_birth", "value": "1941-03-12"}],
            "reason": "misread the certificate",
        },
        headers={"Idempotency-Key": "fix-" + nino},
    )
    assert response.status_code == 201, response.text
    correction = response.json()
    assert correction["event_type"] == "EventCorrected"
    assert correction["reference"] != original["reference"]

    async def at_hmrc() -> dict[str, Any] | None:
        return await _received(services, "hmrc", correction["event_id"])

    copy = await eventually(at_hmrc, timeout=60, what="the correction at hmrc")
    assert copy["corrects_reference"] == original["reference"]
    assert [(c["field"], c["new_value_json"]) for c in copy["changes"]] == [
        ("deceased.date_of_birth", '"1941-03-12"')
    ]
    assert copy["envelope"]["provenance"]["recorded_by"] is None, "hmrc is not granted who recorded it"
    assert copy["envelope"]["informant"]["name"] is None, "nor who informed"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"field": "deceased.nino", "value": "123"}, "National Insurance number"),
        ({"field": "deceased.date_of_birth", "value": "2999-01-01"}, "future"),
        ({"field": "deceased.shoe_size", "value": 9}, "not a field"),
        ({"field": "envelope.registration_office", "value": "bradford"}, "cannot be corrected"),
        ({"field": "next_of_kin.5.relationship", "value": "son"}, "not a field"),
        ({"field": "place_of_death", "value": "x" * 5000}, "at most"),
        ({"field": "place_of_death", "value": "<script>\u0000</script>"}, "control"),
        ({"field": "DROP TABLE", "value": 1}, "pattern"),
    ],
)
async def test_a_bad_correction_is_refused_naming_the_change_and_nothing_is_written(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, change: dict[str, Any], words: str
) -> None:
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    before = await _written(pool)
    response = await intake.post(
        f"/v1/events/{reference}/corrections", json={"changes": [change], "reason": "testing"}
    )
    assert response.status_code == 422, response.text
    assert words.lower() in response.text.lower()
    assert await _written(pool) == before


async def test_only_a_supervisor_may_void_and_a_voided_event_takes_no_more(
    intake: httpx.AsyncClient, bus: RunningBus, pool: asyncpg.Pool, supervisor_token: str
) -> None:
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    refused = await intake.post(f"/v1/events/{reference}/void", json={"reason": "registered in error"})
    assert refused.status_code == 403
    assert "supervisor" in refused.json()["detail"]
    async with _client(bus, supervisor_token) as supervisor:
        voided = await supervisor.post(f"/v1/events/{reference}/void", json={"reason": "registered in error"})
        assert voided.status_code == 201, voided.text
        assert voided.json()["event_type"] == "EventVoided"
        again = await supervisor.post(f"/v1/events/{reference}/void", json={"reason": "twice"})
    assert again.status_code == 422
    assert "voided" in again.text
    correction = await intake.post(
        f"/v1/events/{reference}/corrections",
        json={"changes": [{"field": "place_of_death", "value": "Home"}], "reason": "late"},
    )
    assert correction.status_code == 422


async def test_a_correction_or_void_of_a_follow_up_or_unknown_event_is_refused(
    intake: httpx.AsyncClient,
) -> None:
    reference = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    correction = (
        await intake.post(
            f"/v1/events/{reference}/corrections",
            json={"changes": [{"field": "place_of_death", "value": "Home"}], "reason": "late"},
        )
    ).json()
    again = await intake.post(
        f"/v1/events/{correction['reference']}/corrections",
        json={"changes": [{"field": "reason", "value": "x"}], "reason": "late"},
    )
    assert again.status_code == 422
    assert "only a registration" in again.text
    unknown = await intake.post(
        "/v1/events/TUO-2026-0000-0000/corrections",
        json={"changes": [{"field": "place_of_death", "value": "Home"}], "reason": "late"},
    )
    assert unknown.status_code == 404


async def test_the_api_router_works_alone_on_a_bare_app_given_an_intake(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool, registrar_token: str
) -> None:
    """The handlers are named, module-level routes: the API router and its problem
    handlers serve on any app whose state holds an Intake, without create_app."""
    app = FastAPI()
    app.state.intake = Intake(services, pool)
    app.include_router(api)
    for kind, handler in PROBLEM_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake") as client:
        refused = await client.post("/v1/death-registrations", json=death_registration())
        recorded = await client.post(
            "/v1/death-registrations",
            json=death_registration(),
            headers={"Authorization": f"Bearer {registrar_token}"},
        )
        found = await client.get(
            recorded.json()["status_url"], headers={"Authorization": f"Bearer {registrar_token}"}
        )
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert recorded.status_code == 201, recorded.text
    assert found.status_code == 200
    assert found.json()["reference"] == recorded.json()["reference"]
