"""Load subscriptions from a seed file (the demo's agencies) into PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

SEED_FILE = Path(__file__).parent / "subscriptions.seed.json"


def read_seed(path: Path = SEED_FILE) -> list[dict[str, str | None]]:
    items: list[dict[str, str | None]] = json.loads(path.read_text())["subscriptions"]
    return items


async def load_seed(pool: asyncpg.Pool, items: list[dict[str, str | None]] | None = None) -> int:
    """Insert the seed subscriptions that are not there yet; return how many."""
    items = read_seed() if items is None else items
    async with pool.acquire() as conn, conn.transaction():
        inserted = 0
        for item in items:
            result = await conn.execute(
                "INSERT INTO subscription (agency, event_type, legal_basis, statute)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (agency, event_type) DO NOTHING",
                item["agency"],
                item["event_type"],
                item["legal_basis"],
                item["statute"],
            )
            inserted += int(result.rsplit(" ", 1)[-1])
    return inserted
