"""Registration offices' private signing keys are sealed at rest: whoever reads
``office_signing_key`` straight from PostgreSQL finds no key that signs as the
office, and yet intake signs every event, across rotations, with keys that the
published registry verifies. Migration 0017 seals the raw keys stored before it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pydantic import SecretStr

from operators.services import RunningBus
from producers.accounts import issue_token
from producers.office_keys import OfficeKeyUnavailable, active_key
from runtime.database import MIGRATIONS_DIR, MigrationNeedsSettings, migrate, open_pool
from runtime.sealing import PayloadSealer, new_data_key
from runtime.settings import MissingSetting, Settings
from schemas import decode
from schemas.signatures import OfficeKey, office_source, read_signature, verify
from tests.support import death_registration, eventually, tuo_cli

pytestmark = pytest.mark.integration

SEALING_MIGRATION = "0017_sealed_office_keys.sql"


def _public(private: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def _signing_windows(stored: bytes) -> list[bytes]:
    """Every 32-byte run in ``stored``: each one is tried as a raw Ed25519 private key."""
    return [stored[start : start + 32] for start in range(len(stored) - 31)]


async def _stored_rows(pool: asyncpg.Pool, office: str) -> list[asyncpg.Record]:
    """The office's key rows as a database reader sees them: every column, and the row as text."""
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT k.*, k::text AS row_text FROM office_signing_key k WHERE office = $1 ORDER BY created_at",
        office,
    )
    return rows


def _assert_no_usable_private_key(rows: list[asyncpg.Record], private_keys: list[bytes]) -> None:
    published = {bytes(row["public_key"]) for row in rows}
    for row in rows:
        for column, value in row.items():
            stored = value.encode() if isinstance(value, str) else value
            if not isinstance(stored, bytes):
                continue
            for window in _signing_windows(stored):
                assert _public(window) not in published, f"{column} holds a key that signs as the office"
            for private in private_keys:
                assert private not in stored, f"{column} holds a private key's raw bytes"
                assert private.hex().encode() not in stored, f"{column} holds a private key in hex"


async def _cli(services: Settings, *args: str) -> tuple[int, str]:
    return await asyncio.to_thread(tuo_cli, services, *args)


async def _new_office(services: Settings) -> str:
    office = f"sealed-{uuid.uuid4().hex[:8]}"
    code, output = await _cli(services, "offices", "add", office, "--name", "Sealed Keys Register Office")
    assert code == 0, output
    return office


async def test_the_database_holds_no_usable_office_private_key(
    services: Settings, pool: asyncpg.Pool
) -> None:
    office = await _new_office(services)
    code, output = await _cli(services, "offices", "rotate-key", office)
    assert code == 0, output
    rows = await _stored_rows(pool, office)
    assert [row["retired_at"] is None for row in rows] == [False, True], "one retired key, one active"

    # The keys are there, sealed: with the data key they open to the very keys the registry publishes.
    sealer = PayloadSealer.from_settings(services)
    private_keys = [sealer.open(bytes(row["sealed_private_key"]), row["key_id"].encode()) for row in rows]
    assert [_public(private) for private in private_keys] == [bytes(row["public_key"]) for row in rows]
    # Without it, nothing in the rows signs as the office or spells out a private key.
    _assert_no_usable_private_key(rows, private_keys)
    columns = await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'office_signing_key'"
    )
    assert "private_key" not in {c["column_name"] for c in columns}, "the raw column is gone"

    # A database reader with another data key cannot open them either.
    with pytest.raises(OfficeKeyUnavailable, match="TUO_DATA_KEYS_PREVIOUS"):
        await active_key(pool, office, PayloadSealer(new_data_key()))


async def test_a_raw_private_key_cannot_be_stored_where_a_sealed_one_belongs(pool: asyncpg.Pool) -> None:
    office = f"raw-{uuid.uuid4().hex[:8]}"
    await pool.execute(
        "INSERT INTO registration_office (code, name) VALUES ($1, 'Raw Register Office')", office
    )
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = _public(raw)
    insert = "INSERT INTO office_signing_key (key_id, office, public_key, {column}) VALUES ($1, $2, $3, $4)"
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(insert.format(column="sealed_private_key"), f"{office}.a", office, public, raw)
    with pytest.raises(asyncpg.CheckViolationError):  # the right length, but not sealed
        await pool.execute(
            insert.format(column="sealed_private_key"), f"{office}.b", office, public, b"\0" * 69
        )
    with pytest.raises(asyncpg.UndefinedColumnError):
        await pool.execute(insert.format(column="private_key"), f"{office}.c", office, public, raw)
    assert not await pool.fetchval("SELECT count(*) FROM office_signing_key WHERE office = $1", office)


async def test_events_signed_after_sealing_verify_with_the_published_keys_across_a_rotation(
    bus: RunningBus, services: Settings, pool: asyncpg.Pool
) -> None:
    office = await _new_office(services)
    token = await issue_token(pool, office, "registrar", "sealed keys test")
    base_url = f"http://127.0.0.1:{bus.http_port}"
    sealer = PayloadSealer.from_settings(services)

    async with httpx.AsyncClient(
        base_url=base_url, timeout=10, headers={"Authorization": f"Bearer {token}"}
    ) as client:

        async def submit() -> str:
            response = await client.post(
                "/v1/death-registrations", json=death_registration(registration_office=office)
            )
            assert response.status_code == 201, response.text
            return str(response.json()["event_id"])

        before_rotation = await submit()
        code, output = await _cli(services, "offices", "rotate-key", office)
        assert code == 0, output
        after_rotation = await submit()
        published = {
            entry["key_id"]: OfficeKey.from_json(entry)
            for entry in (await client.get("/v1/signing-keys")).json()
            if entry["office"] == office
        }

    signed_by = {}
    for event_id in (before_rotation, after_rotation):
        row = await pool.fetchrow(
            "SELECT message_value, headers FROM outbox WHERE event_id = $1", uuid.UUID(event_id)
        )
        assert row is not None
        headers = [(name, value.encode()) for name, value in json.loads(row["headers"])]
        name, body = decode(sealer.open(bytes(row["message_value"]), uuid.UUID(event_id)))
        signed = read_signature(headers)
        key_id = signed.manifest.key_id
        # Verified as any agency would, with only what the registry publishes.
        verify(
            signed,
            published.get(key_id),
            event_type=name,
            event_id=event_id,
            source=office_source(office),
            body=body,
            complete=True,
        )
        signed_by[event_id] = key_id

    old, new = signed_by[before_rotation], signed_by[after_rotation]
    assert old != new, "the rotation gave the office a new key"
    retired_at = published[old].retired_at
    assert retired_at is not None and retired_at <= datetime.now(UTC)
    assert published[new].retired_at is None

    async def routed() -> bool:
        # The router verifies each event's signature too: a failure would dead-letter it undecided.
        decided = await pool.fetchval(
            "SELECT count(DISTINCT event_id) FROM routing_decision WHERE event_id = ANY($1::uuid[])",
            [uuid.UUID(before_rotation), uuid.UUID(after_rotation)],
        )
        return bool(decided == 2)

    await eventually(routed, timeout=60, what="routing decisions for both events")


# --- migration 0017 on a database that still holds raw keys -------------------------------------


@pytest.fixture
async def before_sealing(
    services: Settings, pool: asyncpg.Pool
) -> AsyncIterator[tuple[Settings, asyncpg.Pool]]:
    """A fresh database migrated up to just before 0017, as a deployment upgrading would have it."""
    database = f"seal_{uuid.uuid4().hex[:12]}"
    await pool.execute(f'CREATE DATABASE "{database}"')
    url = urlsplit(services.require_database_url())._replace(path=f"/{database}").geturl()
    settings = services.model_copy(update={"database_url": SecretStr(url)})
    try:
        own = await open_pool(settings)
        try:
            await own.execute(
                "CREATE TABLE schema_migration"
                " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name >= SEALING_MIGRATION:
                    break
                async with own.acquire() as conn, conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migration (name) VALUES ($1)", path.name)
            yield settings, own
        finally:
            await own.close()
    finally:
        await pool.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def _store_raw_keys(pool: asyncpg.Pool, office: str) -> list[tuple[str, bytes]]:
    """Two keys (one retired) stored raw, as create_key did before 0017."""
    await pool.execute(
        "INSERT INTO registration_office (code, name) VALUES ($1, 'Old Register Office')", office
    )
    stored = []
    for key_id, retired in ((f"{office}.old", True), (f"{office}.new", False)):
        raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        await pool.execute(
            "INSERT INTO office_signing_key (key_id, office, public_key, private_key, retired_at)"
            " VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END)",
            key_id,
            office,
            _public(raw),
            raw,
            retired,
        )
        stored.append((key_id, raw))
    return stored


async def test_migration_0017_seals_the_raw_keys_stored_before_it_and_the_office_still_signs(
    before_sealing: tuple[Settings, asyncpg.Pool],
) -> None:
    settings, pool = before_sealing
    stored = await _store_raw_keys(pool, "old-office")

    applied = await migrate(pool, settings)

    assert SEALING_MIGRATION in applied
    rows = await _stored_rows(pool, "old-office")
    assert [row["key_id"] for row in rows] == [key_id for key_id, _ in stored]
    _assert_no_usable_private_key(rows, [raw for _, raw in stored])
    key = await active_key(pool, "old-office", PayloadSealer.from_settings(settings))
    assert key.key_id == "old-office.new"
    raw = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert raw == stored[1][1], "the office signs with the same key as before, now sealed"


async def test_tuo_migrate_seals_the_raw_keys(before_sealing: tuple[Settings, asyncpg.Pool]) -> None:
    settings, pool = before_sealing
    stored = await _store_raw_keys(pool, "old-office")
    url = settings.require_database_url()

    code, output = await asyncio.to_thread(tuo_cli, settings, "migrate", env={"TUO_DATABASE_URL": url})

    assert code == 0, output
    assert "Database up to date" in output
    _assert_no_usable_private_key(await _stored_rows(pool, "old-office"), [raw for _, raw in stored])
    key = await active_key(pool, "old-office", PayloadSealer.from_settings(settings))
    assert key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) == stored[1][1]


async def test_migration_0017_without_the_data_key_refuses_and_changes_nothing(
    before_sealing: tuple[Settings, asyncpg.Pool],
) -> None:
    settings, pool = before_sealing
    stored = await _store_raw_keys(pool, "old-office")

    with pytest.raises(MigrationNeedsSettings, match="tuo migrate"):
        await migrate(pool)
    with pytest.raises(MissingSetting, match="data_key"):
        await migrate(pool, settings.model_copy(update={"data_key": None}))

    assert not await pool.fetchval("SELECT 1 FROM schema_migration WHERE name = $1", SEALING_MIGRATION)
    kept = await pool.fetch("SELECT key_id, private_key FROM office_signing_key ORDER BY created_at")
    assert [(row["key_id"], bytes(row["private_key"])) for row in kept] == stored, "nothing lost"


async def test_migration_0017_on_an_empty_database_needs_no_data_key(
    before_sealing: tuple[Settings, asyncpg.Pool],
) -> None:
    _, pool = before_sealing
    assert SEALING_MIGRATION in await migrate(pool)
    assert (
        await pool.fetchval(
            "SELECT is_nullable FROM information_schema.columns"
            " WHERE table_name = 'office_signing_key' AND column_name = 'sealed_private_key'"
        )
        == "NO"
    )
