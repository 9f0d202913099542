"""Load subscriptions from a seed file (the demo's agencies) into PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

SEED_FILE = Path(__file__).parent / "subscriptions.seed.json"


async def load_seed(pool: asyncpg.Pool, path: Path = SEED_FILE) -> int:
    """Insert the seed file's subscriptions that are not there yet; return how many."""
    items = json.loads(path.read_text())["subscriptions"]
    async with pool.acquire() as conn, conn.transaction():
        inserted = 0
        for item in items:
            result = await conn.execute(
                "INSERT INTO subscription (agency, event_type, legal_basis, statute)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (agency, event_type) DO NOTHING",
                item["agency"], item["event_type"], item["legal_basis"], item["statute"],
            )
            inserted += int(result.rsplit(" ", 1)[-1])
    return inserted
