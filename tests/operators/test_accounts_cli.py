"""`tuo offices …`, `tuo users …` and `tuo tokens …` against the running test stack:
what they create works at the front door, and bad input is refused clearly."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from operators.services import RunningBus
from producers.accounts import authenticate
from runtime.settings import Settings
from tests.support import death_registration, eventually, tuo_cli

pytestmark = pytest.mark.integration


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def _cli(services: Settings, *args: str, input: str | None = None) -> tuple[int, str]:
    return await asyncio.to_thread(tuo_cli, services, *args, input=input)


async def test_an_office_gets_a_signing_key_and_rotation_keeps_the_old_one_published(
    services: Settings, pool: asyncpg.Pool
) -> None:
    office = _name("york-")
    code, output = await _cli(services, "offices", "add", office, "--name", "York Register Office")
    assert code == 0, output
    first = await pool.fetchval("SELECT key_id FROM office_signing_key WHERE office = $1", office)
    assert first in output
    code, output = await _cli(services, "offices", "rotate-key", office)
    assert code == 0, output
    keys = await pool.fetch(
        "SELECT key_id, retired_at IS NOT NULL AS retired FROM office_signing_key WHERE office = $1"
        " ORDER BY created_at",
        office,
    )
    assert [(k["key_id"] == first, k["retired"]) for k in keys] == [(True, True), (False, False)]
    code, output = await _cli(services, "offices", "list")
    assert first in output and keys[1]["key_id"] in output


@pytest.mark.parametrize(
    ("code", "words"),
    [("Leeds Office", "lower-case"), ("x", "lower-case"), ("leeds", "already exists")],
)
async def test_a_bad_or_duplicate_office_code_is_refused(services: Settings, code: str, words: str) -> None:
    status, output = await _cli(services, "offices", "add", code, "--name", "Somewhere")
    assert status == 1
    assert words in output


async def test_a_registrar_added_on_the_command_line_can_sign_in(
    services: Settings, pool: asyncpg.Pool
) -> None:
    username = _name("jo.")
    password = "correct horse battery staple"
    code, output = await _cli(
        services,
        "users",
        "add",
        username,
        "--office",
        "leeds",
        "--name",
        "Jo Bloggs",
        "--role",
        "supervisor",
        "--password-stdin",
        input=password + "\n",
    )
    assert code == 0, output
    assert password not in output
    stored = await pool.fetchval("SELECT password_hash FROM registrar WHERE username = $1", username)
    assert stored.startswith("$argon2id$") and password not in stored
    signed_in = await authenticate(pool, username, password)
    assert signed_in is not None and (signed_in.office, signed_in.role) == ("leeds", "supervisor")
    assert await authenticate(pool, username, password + "!") is None
    code, output = await _cli(services, "users", "disable", username)
    assert code == 0, output
    assert await authenticate(pool, username, password) is None, "a disabled registrar cannot sign in"


@pytest.mark.parametrize(
    ("args", "password", "words"),
    [
        (["--office", "leeds", "--name", "A"], "short", "at least 12 characters"),
        (["--office", "nowhere", "--name", "A"], "long enough password", "no office 'nowhere'"),
        (["--office", "leeds", "--name", "A", "--role", "admin"], "long enough password", "role must be"),
    ],
)
async def test_a_bad_registrar_is_refused_and_nothing_is_stored(
    services: Settings, pool: asyncpg.Pool, args: list[str], password: str, words: str
) -> None:
    username = _name("bad.")
    code, output = await _cli(
        services, "users", "add", username, *args, "--password-stdin", input=password + "\n"
    )
    assert code == 1, output
    assert words in output
    assert not await pool.fetchval("SELECT 1 FROM registrar WHERE username = $1", username)


async def test_a_bad_username_is_refused(services: Settings) -> None:
    code, output = await _cli(
        services,
        "users",
        "add",
        "Robert'); DROP TABLE registrar;--",
        "--office",
        "leeds",
        "--name",
        "Bobby",
        "--password-stdin",
        input="long enough password\n",
    )
    assert code == 1
    assert "a username is" in output


async def test_an_issued_token_submits_for_its_office_until_revoked(
    services: Settings, pool: asyncpg.Pool, bus: RunningBus
) -> None:
    label = _name("hospital system ")
    code, output = await _cli(
        services, "tokens", "issue", "--office", "bradford", "--label", label, "--days", "1"
    )
    assert code == 0, output
    token = next(line for line in output.splitlines() if line.startswith("tuo_"))
    stored = await pool.fetchval("SELECT token_hash FROM api_token WHERE label = $1", label)
    assert token.encode() not in bytes(stored), "only a hash of the token is kept"
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}", headers={"Authorization": f"Bearer {token}"}
    ) as client:
        accepted = await client.post("/v1/death-registrations", json=death_registration())
        assert accepted.status_code == 201, accepted.text
        office = await pool.fetchval(
            "SELECT registration_office FROM intake_record WHERE reference = $1", accepted.json()["reference"]
        )
        assert office == "bradford"
        code, output = await _cli(services, "tokens", "revoke", label)
        assert code == 0, output
        reference = accepted.json()["reference"]

        async def turned_away() -> bool:  # intake hears of it by NOTIFY: "within a second"
            return (await client.get(f"/v1/events/{reference}")).status_code == 401

        await eventually(turned_away, timeout=2, what="the revoked token to be refused")
        refused = await client.post("/v1/death-registrations", json=death_registration())
        assert refused.status_code == 401
