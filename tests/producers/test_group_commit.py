"""Registrations sent together share transactions (group commit), and each request
still gets exactly the answer it would have got alone: its own event, its retry's
first answer, its duplicate's refusal, and nothing lost when a group fails."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

import producers.group_commit
from runtime.settings import Settings
from tests.support import death_registration, intake_in_process, random_nino

pytestmark = pytest.mark.integration

DEATHS = "/v1/death-registrations"


async def _post(client: httpx.AsyncClient, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return await client.post(DEATHS, json=body, headers={"Idempotency-Key": key or uuid.uuid4().hex})


def _death() -> dict[str, Any]:
    deceased = {"given_names": "Sam", "family_name": "Together", "nino": random_nino()}
    return death_registration(deceased=deceased)


async def _stored(pool: asyncpg.Pool, references: list[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT i.reference, i.xmin::text AS transaction,"
        "       (SELECT count(*) FROM outbox o WHERE o.event_id = i.event_id) AS outbox_rows,"
        "       (SELECT count(*) FROM consent_receipt r WHERE r.event_id = i.event_id) AS receipts"
        "  FROM intake_record i WHERE i.reference = ANY($1::text[])",
        references,
    )
    return rows


async def test_registrations_sent_together_share_transactions_and_each_is_stored_whole(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    answers = await asyncio.gather(*(_post(intake, _death()) for _ in range(40)))
    assert [a.status_code for a in answers] == [201] * 40, [a.text for a in answers if a.status_code != 201]
    references = [a.json()["reference"] for a in answers]
    assert len(set(references)) == 40, "each request got its own event"

    stored = await _stored(pool, references)
    assert len(stored) == 40
    assert all(row["outbox_rows"] == 1 and row["receipts"] == 2 for row in stored), (
        "each event has its outbox row and a receipt for each of its two consent choices"
    )
    transactions = {row["transaction"] for row in stored}
    assert len(transactions) < 40, "40 registrations sent at once were committed in 40 transactions"


async def test_in_a_burst_a_retry_gets_the_first_answer_and_a_duplicate_is_refused(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    retried, key = _death(), uuid.uuid4().hex
    person = _death()
    informant = {"name": "Jo", "relationship": "son"}
    same_person = {**_death(), "deceased": person["deceased"], "informant": informant}
    reused_key = uuid.uuid4().hex
    others = [_post(intake, _death()) for _ in range(20)]
    answers = await asyncio.gather(
        _post(intake, retried, key),
        *others[:10],
        _post(intake, retried, key),
        _post(intake, person),
        _post(intake, _death(), reused_key),
        *others[10:],
        _post(intake, same_person),
        _post(intake, _death(), reused_key),
    )
    first_try, second_try = answers[0], answers[11]
    assert sorted([first_try.status_code, second_try.status_code]) == [200, 201], "one created, one repeated"
    assert first_try.json()["reference"] == second_try.json()["reference"], "a retry gets the first event"

    twice = [answers[12], answers[-2]]
    assert sorted(a.status_code for a in twice) == [201, 409], [a.text for a in twice]
    kept = next(a for a in twice if a.status_code == 201).json()["reference"]
    assert next(a for a in twice if a.status_code == 409).json()["existing_reference"] == kept
    subject = await pool.fetchval("SELECT subject_id FROM intake_record WHERE reference = $1", kept)
    assert await pool.fetchval("SELECT count(*) FROM intake_record WHERE subject_id = $1", subject) == 1
    assert await pool.fetchval("SELECT count(*) FROM consent_record WHERE subject_id = $1", subject) == 2, (
        "the refused registration's consent choices are not stored"
    )

    reused = [answers[13], answers[-1]]
    assert sorted(a.status_code for a in reused) == [201, 409], "a key used for another request is refused"
    assert sum(a.status_code == 201 for a in answers) == len(answers) - 3  # a retry, two refusals
    references = {a.json()["reference"] for a in answers if a.status_code in (200, 201)}
    assert len(references) == len(answers) - 3  # the retry shares its first answer's event
    assert len(await _stored(pool, sorted(references))) == len(references)


async def test_a_group_whose_transaction_fails_is_recorded_one_by_one_and_loses_nothing(
    services: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = 0
    record_group = producers.group_commit._record_group

    async def fails_once(conn: asyncpg.Connection, *args: Any) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            async with conn.transaction():  # written, then rolled back by the failure
                await record_group(conn, *args)
                raise asyncpg.SerializationError("could not serialize access (injected)")
        return await record_group(conn, *args)

    monkeypatch.setattr(producers.group_commit, "_record_group", fails_once)
    token = await _token(pool)
    async with intake_in_process(services, pool) as (_, client):
        client.headers["Authorization"] = f"Bearer {token}"
        answers = await asyncio.gather(*(_post(client, _death()) for _ in range(12)))
    assert failures == 1
    assert [a.status_code for a in answers] == [201] * 12, [a.text for a in answers if a.status_code != 201]
    references = [a.json()["reference"] for a in answers]
    stored = await _stored(pool, references)
    assert len(stored) == 12 and all(row["outbox_rows"] == 1 and row["receipts"] == 2 for row in stored)


async def _token(pool: asyncpg.Pool) -> str:
    from producers.accounts import issue_token

    return await issue_token(pool, "leeds", "registrar", f"group commit {uuid.uuid4().hex[:8]}")
