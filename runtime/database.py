"""The one way to open a PostgreSQL pool, and the migration runner.

Migrations are the ``.sql`` files in ``runtime/migrations``, applied in name
order, each in its own transaction, and recorded in ``schema_migration``. A
migration that needs what SQL cannot have (the data key, which lives in settings)
has a Python step that runs first in the same transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import asyncpg
import structlog

from runtime.sealing import PayloadSealer
from runtime.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number shared by every process that migrates this database.
_MIGRATION_LOCK = 0x7475_6F00

log = structlog.get_logger(__name__)


async def _release_locks(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock_all()")


async def open_pool(
    settings: Settings, min_size: int = 1, *, reset: Literal["session", "locks"] = "session"
) -> asyncpg.Pool:
    """``reset`` is what a connection goes through on its way back to the pool (an open
    transaction is always rolled back): "session" is asyncpg's full reset (advisory
    locks, cursors, LISTENs, session settings); "locks" releases only the advisory locks
    (the relay's lock is released that way), for the long-running components, which
    change no session state and remove their own listeners."""
    pool = await asyncpg.create_pool(
        settings.require_database_url(),
        min_size=min_size,
        max_size=settings.database_pool_size,
        command_timeout=30,
        reset=_release_locks if reset == "locks" else None,
    )
    assert pool is not None
    return pool


class MigrationNeedsSettings(RuntimeError):
    """A pending migration needs the data key, and ``migrate`` was given no settings."""


async def _seal_office_keys(conn: asyncpg.Connection, settings: Settings | None) -> None:
    """Before 0017: seal each office's stored raw private key, as ``producers.office_keys``
    seals a new one (bound to the key id), into a temporary table that 0017 moves in."""
    await conn.execute(
        "CREATE TEMPORARY TABLE office_key_sealed (key_id text PRIMARY KEY, sealed bytea NOT NULL)"
        " ON COMMIT DROP"
    )
    # No key may be added between sealing and dropping the raw column (an older intake still running).
    await conn.execute("LOCK TABLE office_signing_key IN EXCLUSIVE MODE")
    stored = await conn.fetch("SELECT key_id, private_key FROM office_signing_key")
    if not stored:
        return
    if settings is None:
        raise MigrationNeedsSettings(
            "migration 0017 seals the offices' signing keys with the data key: "
            "run it with `tuo migrate`, which reads TUO_DATA_KEY"
        )
    sealer = PayloadSealer.from_settings(settings)  # MissingSetting when there is no data key
    await conn.executemany(
        "INSERT INTO office_key_sealed (key_id, sealed) VALUES ($1, $2)",
        [(row["key_id"], sealer.seal(bytes(row["private_key"]), row["key_id"].encode())) for row in stored],
    )
    log.info("office_keys_sealed", keys=len(stored))


_BEFORE_SQL: dict[str, Callable[[asyncpg.Connection, Settings | None], Awaitable[None]]] = {
    "0017_sealed_office_keys.sql": _seal_office_keys,
}


async def migrate(pool: asyncpg.Pool, settings: Settings | None = None) -> list[str]:
    """Apply pending migrations; return the names applied now. ``settings`` gives the
    data key to migrations that seal what is already stored (not needed on an empty
    database)."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migration ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migration")}
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if path.name in done:
                    continue
                async with conn.transaction():
                    if step := _BEFORE_SQL.get(path.name):
                        await step(conn, settings)
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migration (name) VALUES ($1)", path.name)
                applied_now.append(path.name)
                log.info("migration_applied", migration=path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now
