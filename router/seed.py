"""Load subscriptions from a seed file (the demo's agencies) into PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from router.store import upsert_subscription
from router.subscription_request import check_paths

SEED_FILE = Path(__file__).parent / "subscriptions.seed.json"


class BadSeed(ValueError):
    """A seed subscription grants a path its event type lacks, or grants one without a reason."""


def read_seed(path: Path = SEED_FILE) -> list[dict[str, Any]]:
    """The seed's subscriptions, each field path checked and given with its reason."""
    items: list[dict[str, Any]] = json.loads(path.read_text())["subscriptions"]
    for item in items:
        where = f"{path.name}: {item.get('agency')} {item.get('event_type')}"
        fields = item.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise BadSeed(f"{where}: fields must map each granted path to why the agency needs it")
        for field, reason in fields.items():
            if not isinstance(reason, str) or len(reason.strip()) < 5:
                raise BadSeed(f"{where}: {field} needs a reason (why the agency needs it)")
        try:
            check_paths(item["event_type"], list(fields))
        except ValueError as exc:
            raise BadSeed(f"{where}: {exc}") from None
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
                fields=None if item.get("fields") is None else sorted(item["fields"]),
                condition=item.get("condition"),
                by="seed",
                reason="the demo seed (router/subscriptions.seed.json)",
            )
    return len(items)
