"""The agency guide (docs/agencies.md) stays true: its code runs against the SDK
as it is, and the store it tells agencies to create is the one the SDK uses."""

from __future__ import annotations

import re
import uuid
from datetime import date
from pathlib import Path

import asyncpg
import pytest

from consumers.sdk import DeliveredEvent, handle_once

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "agencies.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, flags=re.S)


def test_the_guides_python_examples_compile_and_import_what_exists() -> None:
    for block in _blocks("python"):
        compile(block, "docs/agencies.md", "exec")
        for module, names in re.findall(r"^from (\S+) import (.+)$", block, flags=re.M):
            imported = __import__(module, fromlist=["_"])
            for name in names.split(", "):
                assert hasattr(imported, name), f"{module} has no {name}"


@pytest.mark.integration
async def test_the_guides_handler_applies_and_rejects_through_the_sdk(pool: asyncpg.Pool) -> None:
    namespace: dict[str, object] = {}
    exec(_blocks("python")[0], namespace)  # noqa: S102 - our own documentation
    handler = namespace["close_benefit_claim"]
    schema = f"guide_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE SCHEMA {schema}")
    await pool.execute(
        f"CREATE TABLE {schema}.claim (nino text PRIMARY KEY, status text NOT NULL, closed_on date)"
    )
    await pool.execute(f"INSERT INTO {schema}.claim VALUES ('AB123456C', 'open', NULL)")

    def death(nino: str | None) -> DeliveredEvent:
        return DeliveredEvent(
            event_id=str(uuid.uuid4()),
            event_type="DeathRegistered",
            record={"envelope": {"subject": {"nino": nino}}, "date_of_death": date(2026, 11, 1)},
        )

    async def in_schema(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET LOCAL search_path = {schema}")
        await handler(event, conn)  # type: ignore[operator]

    applied = await handle_once(pool, "guide-agency", death("AB123456C"), in_schema)
    assert applied.outcome == "APPLIED"
    assert await pool.fetchval(f"SELECT status FROM {schema}.claim") == "closed"
    unknown = await handle_once(pool, "guide-agency", death("CE123456A"), in_schema)
    assert (unknown.outcome, unknown.reason) == ("REJECTED", "no claim for this National Insurance number")
    withheld = await handle_once(pool, "guide-agency", death(None), in_schema)
    assert withheld.reason == "the National Insurance number was not delivered"


@pytest.mark.integration
async def test_the_store_the_guide_asks_agencies_to_create_is_the_sdks(pool: asyncpg.Pool) -> None:
    [ddl] = [b for b in _blocks("sql") if "agency.inbox" in b]
    documented = re.findall(r"^\s+(\w+)\s+(\w+)", ddl.split("CREATE TABLE", 1)[1], flags=re.M)
    actual = await pool.fetch(
        "SELECT column_name, udt_name FROM information_schema.columns"
        " WHERE table_schema = 'agency' AND table_name = 'inbox' ORDER BY ordinal_position"
    )
    types = {"text": "text", "uuid": "uuid", "timestamptz": "timestamptz"}
    assert [(name, types[kind]) for name, kind in documented if name != "PRIMARY"] == [
        (r["column_name"], r["udt_name"]) for r in actual
    ]
