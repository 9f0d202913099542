"""Load subscriptions from a seed file (the demo's agencies) into PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from router.store import upsert_subscription

SEED_FILE = Path(__file__).parent / "subscriptions.seed.json"


def read_seed(path: Path = SEED_FILE) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(path.read_text())["subscriptions"]
    return items


async def load_seed(pool: asyncpg.Pool, items: list[dict[str, Any]] | None = None) -> int:
    """Insert or refresh the seed subscriptions; return how many there are."""
    items = read_seed() if items is None else items
    async with pool.acquire() as conn, conn.transaction():
        for item in items:
            await upsert_subscription(
                conn,
                agency=item["agency"],
                event_type=item["event_type"],
                legal_basis=item["legal_basis"],
                statute=item.get("statute"),
                fields=item.get("fields"),
                condition=item.get("condition"),
            )
    return len(items)
