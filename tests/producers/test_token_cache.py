"""Intake remembers current API tokens (no look-up per request) and still refuses a
revoked one within a second: PostgreSQL tells it of every change to a token, and
when it cannot be told it remembers nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from producers.accounts import issue_token, revoke_tokens
from producers.intake import create_app
from runtime.settings import Settings
from tests.support import eventually

pytestmark = pytest.mark.integration

NO_SUCH_EVENT = "/v1/events/TUO-2026-ABCD-EFGH"  # 404 to a current token, 401 to any other


@asynccontextmanager
async def _intake(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(services.model_copy(update={"session_cookie_secure": False}), pool)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://intake") as client,
    ):
        yield app, client


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
    async with _intake(services, pool) as (app, client):
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
    async with _intake(services, pool) as (app, client):
        tokens = app.state.intake.tokens
        assert await _status(client, token) == 404  # remembered
        await pool.execute("SELECT pg_terminate_backend($1)", tokens._connection.get_server_pid())

        async def deaf() -> bool:
            return not tokens.listening

        await eventually(deaf, timeout=5, what="the cache to notice its connection is gone")
        before = tokens.lookups
        assert await _status(client, token) == 404
        assert tokens.lookups == before + 1, "asked the database, not its memory"
        await pool.execute("UPDATE api_token SET revoked_at = now() WHERE label = $1", label)
        assert await _status(client, token) == 401

        async def listening_again() -> bool:
            return bool(tokens.listening)

        await eventually(listening_again, timeout=10, what="the cache to listen again")
        other = await issue_token(pool, "leeds", "registrar", label + " 2")
        assert [await _status(client, other) for _ in range(2)] == [404, 404]
        await revoke_tokens(pool, label + " 2")
        await _refused_within_a_second(client, other)
