"""`tuo audit verify`: the routing decisions' hash chain shows every altered,
removed or inserted row."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest

from runtime.settings import Settings
from tests.support import death_registration, eventually, tuo_cli

pytestmark = pytest.mark.integration


def _verify(settings: Settings, schema: str = "public") -> tuple[int, str]:
    return tuo_cli(settings, "audit", "verify", "--schema", schema)


async def _some_decisions(intake: httpx.AsyncClient, pool: asyncpg.Pool, at_least: int) -> None:
    for _ in range(2):
        await intake.post("/v1/death-registrations", json=death_registration())

    async def enough() -> bool:
        count: int = await pool.fetchval("SELECT count(*) FROM routing_decision")
        return count >= at_least

    await eventually(enough, what=f"{at_least} decisions in PostgreSQL")


async def _copy_of_the_chain(pool: asyncpg.Pool, prefix: str) -> str:
    """A schema holding a copy of each chain (routing_decision, data_look), indexed on seq
    like the real ones (but not unique, so that a test can insert a row twice)."""
    copy = prefix + uuid.uuid4().hex[:8]
    await pool.execute(
        f"CREATE SCHEMA {copy}; CREATE TABLE {copy}.routing_decision AS SELECT * FROM routing_decision;"
        f" CREATE INDEX ON {copy}.routing_decision (seq);"
        f" CREATE TABLE {copy}.data_look AS SELECT * FROM data_look; CREATE INDEX ON {copy}.data_look (seq)"
    )
    return copy


async def test_decisions_are_chained_and_verify(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    await _some_decisions(intake, pool, at_least=12)
    code, output = await asyncio.to_thread(_verify, services)
    assert code == 0, output
    assert "the chain is intact" in output
    seqs = [r["seq"] for r in await pool.fetch("SELECT seq FROM routing_decision ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_altered_removed_and_inserted_rows_are_each_named(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    await _some_decisions(intake, pool, at_least=12)
    copy = await _copy_of_the_chain(pool, "tamper_")  # tamper with a copy, not the suite's real chain
    try:
        last = await pool.fetchval(f"SELECT max(seq) FROM {copy}.routing_decision")
        code, output = await asyncio.to_thread(_verify, services, copy)
        assert code == 0, output

        await pool.execute(
            f"UPDATE {copy}.routing_decision SET legal_basis = 'statutory: made up' WHERE seq = 3"
        )
        await pool.execute(f"DELETE FROM {copy}.routing_decision WHERE seq = 6")
        await pool.execute(
            f"INSERT INTO {copy}.routing_decision SELECT * FROM {copy}.routing_decision WHERE seq = 8"
        )
        await pool.execute(
            f"UPDATE {copy}.routing_decision SET seq = {last + 1}, agency = 'hmpo'"
            f" WHERE ctid = (SELECT max(ctid) FROM {copy}.routing_decision WHERE seq = 8)"
        )
        code, output = await asyncio.to_thread(_verify, services, copy)
        assert code == 1
        lines = output.replace("\n", " ")
        assert "row 3 altered" in lines
        assert "row 6 removed: row 6 is missing before row 7" in lines
        assert f"row {last + 1} inserted" in lines
        assert "4 problem(s) in" in lines, "inserted row: wrong predecessor and wrong hash"
    finally:
        await pool.execute(f"DROP SCHEMA {copy} CASCADE")


async def test_rows_from_before_the_chain_are_sealed_and_then_verify(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    from router.audit import seal_unsealed

    await _some_decisions(intake, pool, at_least=12)
    copy = await _copy_of_the_chain(pool, "legacy_")
    try:
        await pool.execute(f"UPDATE {copy}.routing_decision SET hash = NULL, prev_hash = NULL")  # as migrated
        code, output = await asyncio.to_thread(_verify, services, copy)
        assert code == 1 and "altered" in output
        async with pool.acquire() as conn:
            await conn.execute(f"SET search_path TO {copy}")
            sealed = await seal_unsealed(conn)
            await conn.execute("SET search_path TO public")
        assert sealed == await pool.fetchval(f"SELECT count(*) FROM {copy}.routing_decision")
        code, output = await asyncio.to_thread(_verify, services, copy)
        assert code == 0, output
    finally:
        await pool.execute(f"DROP SCHEMA {copy} CASCADE")


async def test_a_batch_of_decisions_is_chained_once_each_in_order(
    pool: asyncpg.Pool, services: Settings, bus: object
) -> None:
    from datetime import UTC, datetime

    from router import audit

    def decision(event_id: str, agency: str) -> audit.Decision:
        return audit.Decision(
            event_id=event_id,
            agency=agency,
            event_type="DeathRegistered",
            outcome="DELIVERED",
            legal_basis="statutory: test",
            decided_at=datetime.now(UTC),
            fields_delivered=["deceased"],
            fields_withheld=[],
        )

    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with pool.acquire() as conn, conn.transaction():
        assert await audit.append_many(conn, [decision(first, "hmrc")]) == 1
    batch = [
        decision(first, "hmrc"),
        decision(second, "hmrc"),
        decision(second, "dwp"),
        decision(second, "hmrc"),
    ]
    async with pool.acquire() as conn, conn.transaction():
        assert await audit.append_many(conn, batch) == 2, "already chained and repeated ones are skipped"
    rows = await pool.fetch(
        "SELECT event_id::text, agency, seq FROM routing_decision"
        " WHERE event_id = ANY($1::uuid[]) ORDER BY seq",
        [first, second],
    )
    assert [(r["event_id"], r["agency"]) for r in rows] == [
        (first, "hmrc"),
        (second, "hmrc"),
        (second, "dwp"),
    ]
    assert rows[2]["seq"] - rows[1]["seq"] == 1
    code, output = await asyncio.to_thread(_verify, services)
    assert code == 0 and "the chain is intact" in output, output
