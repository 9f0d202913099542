"""Intake remembers current API tokens, the agencies that take consent and each
office's signing key (no look-up per request), and still sees a change within a
second: PostgreSQL tells it of every change (runtime.notices), and when it cannot be
told it remembers nothing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import httpx
import pytest

from producers.accounts import issue_token, revoke_tokens
from producers.office_keys import create_key
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas.signatures import key_id_of
from tests.support import death_registration, eventually, intake_in_process

pytestmark = pytest.mark.integration

NO_SUCH_EVENT = "/v1/events/TUO-2026-ABCD-EFGH"  # 404 to a current token, 401 to any other


async def _status(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get(NO_SUCH_EVENT, headers={"Authorization": f"Bearer {token}"})).status_code


async def _refused_within_a_second(client: httpx.AsyncClient, token: str) -> float:
    revoked = time.monotonic()
    while await _status(client, token) != 401:
        waited = time.monotonic() - revoked
        assert waited < 1.0, "the revoked token was still accepted a second later"
        await asyncio.sleep(0.02)
    return time.monotonic() - revoked


async def test_a_revoked_token_is_refused_within_a_second_though_tokens_are_cached(
    services: Settings, pool: asyncpg.Pool
) -> None:
    label = f"cached system {uuid.uuid4().hex[:8]}"
    token = await issue_token(pool, "leeds", "registrar", label)
    async with intake_in_process(services, pool) as (app, client):
        tokens = app.state.intake.tokens
        assert [await _status(client, token) for _ in range(3)] == [404, 404, 404]
        assert tokens.lookups == 1, "the token was looked up once, then remembered"

        assert await revoke_tokens(pool, label) == 1  # another connection, as `tuo tokens revoke`
        await _refused_within_a_second(client, token)


async def test_with_its_notices_cut_off_intake_asks_the_database_every_time(
    services: Settings, pool: asyncpg.Pool
) -> None:
    """A lost listening connection could miss a revocation: until it listens again, intake
    remembers nothing, so a token revoked meanwhile is refused at once."""
    label = f"uncached system {uuid.uuid4().hex[:8]}"
    token = await issue_token(pool, "leeds", "registrar", label)
    async with intake_in_process(services, pool) as (app, client):
        tokens, notices = app.state.intake.tokens, app.state.intake.notices
        assert await _status(client, token) == 404  # remembered
        await pool.execute("SELECT pg_terminate_backend($1)", notices.connection.get_server_pid())

        async def deaf() -> bool:
            return not notices.listening

        await eventually(deaf, timeout=5, what="the cache to notice its connection is gone")
        before = tokens.lookups
        assert await _status(client, token) == 404
        assert tokens.lookups == before + 1, "asked the database, not its memory"
        await pool.execute("UPDATE api_token SET revoked_at = now() WHERE label = $1", label)
        assert await _status(client, token) == 401

        async def listening_again() -> bool:
            return bool(notices.listening)

        await eventually(listening_again, timeout=10, what="the cache to listen again")
        other = await issue_token(pool, "leeds", "registrar", label + " 2")
        assert [await _status(client, other) for _ in range(2)] == [404, 404]
        await revoke_tokens(pool, label + " 2")
        await _refused_within_a_second(client, other)


async def _register(client: httpx.AsyncClient, token: str, **overrides: object) -> httpx.Response:
    return await client.post(
        "/v1/death-registrations",
        json=death_registration(**overrides),
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex},
    )


async def _signed_with(pool: asyncpg.Pool, response: httpx.Response) -> str | None:
    """The key the event was signed with, which must not have retired before it was recorded
    (agencies would refuse it)."""
    assert response.status_code == 201, response.text
    row = await pool.fetchrow(
        "SELECT o.headers, i.recorded_at FROM outbox o JOIN intake_record i USING (event_id)"
        " WHERE o.event_id = $1",
        uuid.UUID(response.json()["event_id"]),
    )
    key_id = key_id_of([(name, value.encode()) for name, value in json.loads(row["headers"])])
    retired = await pool.fetchval("SELECT retired_at FROM office_signing_key WHERE key_id = $1", key_id)
    assert retired is None or row["recorded_at"] < retired, f"recorded after its key {key_id} retired"
    return key_id


async def test_a_rotated_signing_key_signs_the_next_event_though_keys_are_cached(
    services: Settings, pool: asyncpg.Pool
) -> None:
    token = await issue_token(pool, "leeds", "registrar", f"signing system {uuid.uuid4().hex[:8]}")
    async with intake_in_process(services, pool) as (app, client):
        keys = app.state.intake.signing_keys
        first = [await _signed_with(pool, await _register(client, token)) for _ in range(3)]
        assert len(set(first)) == 1 and first[0] is not None
        assert keys.lookups == 1, "the office's key was read and opened once, then remembered"

        async with pool.acquire() as conn:  # another connection, as `tuo offices rotate-key`
            rotated = await create_key(conn, "leeds", PayloadSealer.from_settings(services))
        started = time.monotonic()
        while (signed := await _signed_with(pool, await _register(client, token))) != rotated:
            assert signed == first[0], f"signed with {signed}, neither the old key nor the new"
            assert time.monotonic() - started < 1.0, "still signing with the retired key a second later"
            await asyncio.sleep(0.02)


async def test_an_event_signed_with_a_key_rotated_unheard_of_is_signed_again_with_the_new_key(
    services: Settings, pool: asyncpg.Pool
) -> None:
    """Were a rotation's notice late, an event signed with the retired key would be refused
    by every agency: intake finds the key retired when it stores the event, and signs again."""
    token = await issue_token(pool, "leeds", "registrar", f"late notice {uuid.uuid4().hex[:8]}")
    async with intake_in_process(services, pool) as (app, client):
        old = await _signed_with(pool, await _register(client, token))
        async with pool.acquire() as conn, conn.transaction():
            # Rotated unannounced, as if its notice were still on its way to intake.
            await conn.execute("ALTER TABLE office_signing_key DISABLE TRIGGER office_signing_key_changed")
            rotated = await create_key(conn, "leeds", PayloadSealer.from_settings(services))
            await conn.execute("ALTER TABLE office_signing_key ENABLE TRIGGER office_signing_key_changed")
        lookups = app.state.intake.signing_keys.lookups
        assert await _signed_with(pool, await _register(client, token)) == rotated != old
        assert app.state.intake.signing_keys.lookups == lookups + 1, "the remembered key was dropped"


async def test_an_agency_newly_taking_consent_is_offered_it_within_a_second_though_cached(
    services: Settings, pool: asyncpg.Pool
) -> None:
    agency = f"consent-{uuid.uuid4().hex[:8]}"
    consents = [{"agency": agency, "choice": "given"}]
    token = await issue_token(pool, "leeds", "registrar", f"consenting system {uuid.uuid4().hex[:8]}")
    async with intake_in_process(services, pool) as (app, client):
        refused = await _register(client, token, consents=consents)
        assert refused.status_code == 422
        assert f"{agency} does not receive DeathRegistered on consent" in refused.text
        cached = app.state.intake.consent_agencies
        before = cached.lookups
        assert (await _register(client, token, consents=consents)).status_code == 422
        assert cached.lookups == before, "the agencies taking consent were remembered"
        try:
            # Suspended: the router delivers nothing to it, so no other test is disturbed.
            await pool.execute(
                "INSERT INTO subscription (agency, event_type, fields, legal_basis, status)"
                " VALUES ($1, 'DeathRegistered', '{}', 'consent', 'suspended')",
                agency,
            )
            started = time.monotonic()
            while (await _register(client, token, consents=consents)).status_code != 201:
                assert time.monotonic() - started < 1.0, (
                    "the new consent agency was still refused a second later"
                )
                await asyncio.sleep(0.02)
        finally:
            await pool.execute("DELETE FROM subscription WHERE agency = $1", agency)
