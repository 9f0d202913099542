"""The agencies' HTTPS API on the session's bus: OAuth2 client-credentials tokens, receipts
posted over HTTPS, and the pull feed, each scoped to the caller's own agency.

Two agencies are onboarded: ``a`` is told of every death (statutory), ``b`` only where
the informant consents. One death is registered with consent for ``b``, one without, so
``a`` has both deliveries and ``b`` only the first."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from consumers.agency_api import create_client, revoke_client
from router.store import upsert_subscription
from runtime.access import onboard_agency
from runtime.settings import Settings
from tests.support import death_registration, eventually, random_nino, tuo_cli

pytestmark = pytest.mark.integration


@dataclass
class World:
    a: str
    b: str
    both: str  # an event delivered to a and b
    only_a: str  # an event delivered to a only
    credentials: dict[str, tuple[str, str]]  # agency → (client id, secret)


@pytest.fixture(scope="module")
async def world(
    services: Settings, pool: asyncpg.Pool, bus: Any, registrar_token: str
) -> AsyncIterator[World]:
    suffix = uuid.uuid4().hex[:6]
    a, b = f"api-a-{suffix}", f"api-b-{suffix}"
    for agency, basis in ((a, "statutory"), (b, "consent")):
        await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")
        await upsert_subscription(
            pool,
            agency=agency,
            event_type="DeathRegistered",
            legal_basis=basis,
            statute="Test Act 2026 s.2" if basis == "statutory" else None,
            fields=None,
            condition=None,
        )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}", headers={"Authorization": f"Bearer {registrar_token}"}
    ) as intake:
        events = []
        for consents in ([{"agency": b, "choice": "given"}], []):
            body = death_registration(
                deceased={
                    "given_names": "Api",
                    "family_name": "Feed",
                    "date_of_birth": "1941-03-02",
                    "nino": random_nino(),
                },
                consents=consents,
            )
            response = await intake.post("/v1/death-registrations", json=body)
            assert response.status_code == 201, response.text
            events.append(response.json()["event_id"])

    async def decided() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM routing_decision"
            " WHERE event_id = ANY($1::uuid[]) AND agency = ANY($2::text[])",
            events,
            [a, b],
        )
        return bool(n == 4)

    await eventually(decided, timeout=60, what="the routing decisions stored")
    credentials = {}
    for agency in (a, b):
        made = await create_client(pool, agency, by="tests")
        credentials[agency] = (made.client_id, made.client_secret)
    yield World(a, b, events[0], events[1], credentials)
    await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = ANY($1::text[])", [a, b])


@pytest.fixture
async def api(bus: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as client:
        yield client


async def _token(api: httpx.AsyncClient, credentials: tuple[str, str], **form: str) -> str:
    answer = await api.post(
        "/oauth/token", data={"grant_type": "client_credentials", **form}, auth=credentials
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_client_gets_a_token_and_only_hashes_are_stored(
    api: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    client_id, secret = world.credentials[world.a]
    answer = await api.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert answer.status_code == 200, answer.text
    issued = answer.json()
    assert issued["token_type"] == "Bearer" and issued["expires_in"] == 3600
    assert set(issued["scope"].split()) == {
        "receipts:write",
        "events:read",
        "interest:write",
        "subscriptions:manage",
    }
    assert answer.headers["cache-control"] == "no-store"
    # The secret in the form body works too (client_secret_post).
    posted = await api.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    assert posted.status_code == 200, posted.text
    stored = await pool.fetch("SELECT token_hash FROM agency_api_token WHERE client_id = $1", client_id)
    assert hashlib.sha256(issued["access_token"].encode()).digest() in {r["token_hash"] for r in stored}
    secret_hash = await pool.fetchval(
        "SELECT secret_hash FROM agency_api_client WHERE client_id = $1", client_id
    )
    assert secret_hash == hashlib.sha256(secret.encode()).digest()


@pytest.mark.parametrize(
    ("form", "auth", "status", "error"),
    [
        ({"grant_type": "client_credentials"}, "wrong-secret", 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, "unknown-client", 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, None, 401, "invalid_client"),
        (
            {"grant_type": "password", "username": "x", "password": "y"},
            "right",
            400,
            "unsupported_grant_type",
        ),
        ({"grant_type": "client_credentials", "scope": "admin"}, "right", 400, "invalid_scope"),
    ],
    ids=["wrong-secret", "unknown-client", "no-credentials", "password-grant", "unknown-scope"],
)
async def test_the_token_endpoint_refuses_bad_requests_in_oauth_terms(
    api: httpx.AsyncClient, world: World, form: dict[str, str], auth: str | None, status: int, error: str
) -> None:
    client_id, secret = world.credentials[world.a]
    credentials = {
        "wrong-secret": (client_id, secret + "x"),
        "unknown-client": (f"{world.a}.0000000000000000", secret),
        "right": (client_id, secret),
        None: None,
    }[auth]
    answer = await api.post("/oauth/token", data=form, auth=credentials)  # type: ignore[arg-type]
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert "access_token" not in answer.json()


async def test_the_token_endpoint_wants_a_form(api: httpx.AsyncClient, world: World) -> None:
    answer = await api.post(
        "/oauth/token", json={"grant_type": "client_credentials"}, auth=world.credentials[world.a]
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"


async def test_receipts_posted_over_https_are_stored_once_and_shown_in_status(
    api: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings, world: World
) -> None:
    token = await _token(api, world.credentials[world.a])
    receipt = {"event_id": world.only_a, "outcome": "REJECTED", "reason": "no record of this person here"}
    first = await api.post("/v1/receipts", json=receipt, headers=_bearer(token))
    assert first.status_code == 201, first.text
    assert first.json() == {
        "event_id": world.only_a,
        "agency": world.a,
        "outcome": "REJECTED",
        "stored": True,
    }
    again = await api.post("/v1/receipts", json=receipt, headers=_bearer(token))
    assert again.status_code == 200 and again.json()["stored"] is False
    rows = await pool.fetch(
        "SELECT outcome, reason FROM delivery_receipt WHERE event_id = $1 AND agency = $2",
        uuid.UUID(world.only_a),
        world.a,
    )
    assert [dict(r) for r in rows] == [{"outcome": "REJECTED", "reason": "no record of this person here"}]
    reference = await pool.fetchval(
        "SELECT reference FROM intake_record WHERE event_id = $1", uuid.UUID(world.only_a)
    )
    code, out = await asyncio.to_thread(
        tuo_cli, services, "status", reference, "--reason", "checking a test event"
    )
    [row] = [line for line in out.splitlines() if world.a in line]
    assert code == 0 and "rejected" in row and "no record of this person here" in row, out


async def test_one_agency_cannot_receipt_or_read_what_was_delivered_to_another(
    api: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    token_b = await _token(api, world.credentials[world.b])
    # only_a was withheld from b (no consent): b cannot receipt it …
    refused = await api.post(
        "/v1/receipts", json={"event_id": world.only_a, "outcome": "APPLIED"}, headers=_bearer(token_b)
    )
    assert refused.status_code == 404, refused.text
    # … nor name another agency in a receipt (the agency is always the token's) …
    named = await api.post(
        "/v1/receipts",
        json={"event_id": world.both, "outcome": "APPLIED", "agency": world.a},
        headers=_bearer(token_b),
    )
    assert named.status_code == 422, named.text
    # Nothing was stored for anyone by those two requests.
    assert not await pool.fetchval("SELECT count(*) FROM delivery_receipt WHERE agency = $1", world.b)
    assert not await pool.fetchval(
        "SELECT count(*) FROM delivery_receipt WHERE event_id = $1 AND agency = $2 AND outcome = 'APPLIED'",
        uuid.UUID(world.both),
        world.a,
    )
    # … and its feed holds only what b was given.
    feed = await api.get(
        "/v1/agency/events", params={"since": "2000-01-01T00:00:00Z"}, headers=_bearer(token_b)
    )
    assert feed.status_code == 200, feed.text
    assert feed.json()["agency"] == world.b
    assert [e["event_id"] for e in feed.json()["events"]] == [world.both]


async def test_the_feed_pages_through_what_was_delivered_with_its_receipts(
    api: httpx.AsyncClient, world: World
) -> None:
    token = await _token(api, world.credentials[world.a])
    first = await api.get(
        "/v1/agency/events", params={"since": "2000-01-01T00:00:00Z", "limit": 1}, headers=_bearer(token)
    )
    assert first.status_code == 200, first.text
    page = first.json()
    assert [e["event_id"] for e in page["events"]] == [world.both]
    assert page["events"][0]["event_type"] == "DeathRegistered" and page["events"][0]["reference"]
    second = await api.get("/v1/agency/events", params={**page["next"], "limit": 1}, headers=_bearer(token))
    assert [e["event_id"] for e in second.json()["events"]] == [world.only_a]
    third = await api.get(
        "/v1/agency/events", params={**second.json()["next"], "limit": 1}, headers=_bearer(token)
    )
    assert third.json()["events"] == [] and "next" not in third.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outcome": "APPLIED"}, "event_id"),
        ({"event_id": "not-a-uuid", "outcome": "APPLIED"}, "event_id"),
        ({"event_id": "{event}", "outcome": "DONE"}, "outcome"),
        ({"event_id": "{event}", "outcome": "REJECTED"}, "needs a reason"),
        ({"event_id": "{event}", "outcome": "APPLIED", "reason": "why not"}, "needs a reason"),
        ({"event_id": "{event}", "outcome": "REJECTED", "reason": "x" * 501}, "reason"),
        ({"event_id": "{event}", "outcome": "REJECTED", "reason": "line\nbreak"}, "plain text"),
        ({"event_id": "{event}", "outcome": "APPLIED", "received_at": "yesterday"}, "received_at"),
    ],
    ids=[
        "no-id",
        "bad-id",
        "bad-outcome",
        "rejected-no-reason",
        "applied-with-reason",
        "long",
        "newline",
        "bad-time",
    ],
)
async def test_a_malformed_receipt_is_refused_with_what_is_wrong(
    api: httpx.AsyncClient, world: World, body: dict[str, Any], field: str
) -> None:
    token = await _token(api, world.credentials[world.a])
    body = {k: (world.both if v == "{event}" else v) for k, v in body.items()}
    answer = await api.post("/v1/receipts", json=body, headers=_bearer(token))
    assert answer.status_code == 422, answer.text
    assert field in answer.text


async def test_tokens_that_are_missing_expired_revoked_or_narrow_are_refused(
    api: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    receipt = {"event_id": world.both, "outcome": "RECEIVED"}
    assert (await api.post("/v1/receipts", json=receipt)).status_code == 401
    assert (await api.post("/v1/receipts", json=receipt, headers=_bearer("made-up"))).status_code == 401
    assert (
        await api.post("/v1/receipts", content=b"x", headers={"content-type": "text/plain"})
    ).status_code == 415

    narrow = await _token(api, world.credentials[world.a], scope="events:read")
    answer = await api.post("/v1/receipts", json=receipt, headers=_bearer(narrow))
    assert answer.status_code == 403 and "receipts:write" in answer.text

    expiring = await _token(api, world.credentials[world.a])
    await pool.execute(
        "UPDATE agency_api_token SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
        hashlib.sha256(expiring.encode()).digest(),
    )
    assert (await api.post("/v1/receipts", json=receipt, headers=_bearer(expiring))).status_code == 401

    made = await create_client(pool, world.a, by="tests")
    live = await _token(api, (made.client_id, made.client_secret))
    assert (
        await api.get("/v1/agency/events", params={"since": "2026-01-01T00:00:00Z"}, headers=_bearer(live))
    ).status_code == 200
    assert await revoke_client(pool, made.client_id, by="tests")
    gone = await api.get("/v1/agency/events", params={"since": "2026-01-01T00:00:00Z"}, headers=_bearer(live))
    assert gone.status_code == 401
    again = await api.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(made.client_id, made.client_secret)
    )
    assert again.status_code == 401


async def test_a_client_made_for_receipts_only_gets_tokens_for_receipts_only(
    api: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    made = await create_client(pool, world.a, by="tests", scopes=("receipts:write",))
    credentials = (made.client_id, made.client_secret)
    answer = await api.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=credentials)
    assert answer.status_code == 200 and answer.json()["scope"] == "receipts:write", answer.text
    feed = await api.get(
        "/v1/agency/events",
        params={"since": "2026-01-01T00:00:00Z"},
        headers=_bearer(answer.json()["access_token"]),
    )
    assert feed.status_code == 403, feed.text
    wider = await api.post(
        "/oauth/token", data={"grant_type": "client_credentials", "scope": "events:read"}, auth=credentials
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope", wider.text
    with pytest.raises(ValueError, match="scopes are some of"):
        await create_client(pool, world.a, by="tests", scopes=("admin",))


def test_agency_clients_are_made_and_revoked_from_the_command_line(
    services: Settings, pool: asyncpg.Pool
) -> None:
    code, out = tuo_cli(services, "agencies", "client", "hmrc", "--by", "ops")
    assert code == 0 and "Client id: hmrc." in out and "Client secret (shown once" in out, out
    client_id = out.split("Client id: ")[1].split()[0]
    code, out = tuo_cli(services, "agencies", "revoke-client", client_id)
    assert code == 0 and f"Revoked {client_id}" in out, out
    code, out = tuo_cli(services, "agencies", "revoke-client", client_id)
    assert code == 1 and "no live client" in out, out
    code, out = tuo_cli(services, "agencies", "client", "no-such-agency")
    assert code == 1 and "no agency 'no-such-agency'" in out, out
    code, out = tuo_cli(services, "agencies", "client", "hmrc", "--scope", "admin")
    assert code == 1 and "not a scope: admin" in out, out
    code, out = tuo_cli(services, "agencies", "client", "hmrc", "--scope", "events:read")
    assert code == 0 and "(scopes: events:read)" in out, out
