"""The one way to open a PostgreSQL pool, and the migration runner.

Migrations are the ``.sql`` files in ``runtime/migrations``, applied in name
order, each in its own transaction, and recorded in ``schema_migration``.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import structlog

from runtime.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number shared by every process that migrates this database.
_MIGRATION_LOCK = 0x7475_6F00

log = structlog.get_logger(__name__)


async def open_pool(settings: Settings, min_size: int = 1) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.require_database_url(),
        min_size=min_size,
        max_size=settings.database_pool_size,
        command_timeout=30,
    )
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations; return the names applied now."""
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
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migration (name) VALUES ($1)", path.name)
                applied_now.append(path.name)
                log.info("migration_applied", migration=path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now
