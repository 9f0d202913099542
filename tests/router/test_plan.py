"""The order router.plan reads in, on which the citizen's withdrawal guarantee rests
(the router and replay both read through it; the race itself: test_withdrawal_race.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest

from router.messages import Incoming
from router.plan import read_inputs
from router.rules import RoutableEvent
from router.store import OriginalEvent, current_consent


class _RecordingConnection:
    """Answers every query with nothing, and remembers what was asked, in order."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[Any, ...]]] = []

    async def fetchval(self, sql: str, *args: Any) -> datetime:
        self.asked.append((sql, args))
        return datetime(2026, 12, 6, tzinfo=UTC)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.asked.append((sql, args))
        return []


def _incoming(event_type: str, follows: tuple[str, str] | None = None) -> Incoming:
    event = RoutableEvent(event_id="e-" + event_type, event_type=event_type, subject_id="n-subject")
    # Reading inputs looks only at the event and what it follows.
    return Incoming(cast(Any, None), event, {}, "/offices/leeds", cast(Any, None), follows=follows)


async def test_the_clock_is_read_before_consent_and_a_correction_is_judged_on_its_originals_type() -> None:
    conn = _RecordingConnection()

    async def originals_of(_: asyncpg.Connection, ids: list[str]) -> dict[str, OriginalEvent]:
        conn.asked.append(("originals", (ids,)))
        return {"e-death": OriginalEvent("DeathRegistered", [])}

    correction = _incoming("EventCorrected", follows=("e-death", "BirthRegistered"))
    inputs = await read_inputs(
        cast(asyncpg.Connection, conn), [_incoming("BirthRegistered"), correction], originals_of
    )

    steps = [sql for sql, _ in conn.asked]
    assert "clock_timestamp()" in steps[0]
    assert "FROM subscription" in steps[1]
    assert steps[2] == "originals"
    assert "FROM consent_record" in steps[3] and len(steps) == 4
    subjects, types = conn.asked[3][1]
    # A withdrawal made for the death is honoured for its correction, whatever the correction claims.
    assert sorted(zip(subjects, types, strict=True)) == [
        ("n-subject", "BirthRegistered"),
        ("n-subject", "DeathRegistered"),
    ]
    assert inputs.now == datetime(2026, 12, 6, tzinfo=UTC)


@pytest.mark.integration
async def test_consent_read_for_a_batch_is_the_latest_choice_per_agency_as_the_view_gives_it(
    pool: asyncpg.Pool,
) -> None:
    """The batch's consent read looks each subject up by the index (it once read the whole
    table per batch); it must answer exactly what the ``current_consent`` view answers."""
    alice, bob, carol = (f"s-{uuid.uuid4().hex}" for _ in range(3))
    history = [
        (alice, "dvla", "DeathRegistered", "given"),
        (alice, "dvla", "DeathRegistered", "withdrawn"),  # the later choice wins
        (alice, "hmpo", "DeathRegistered", "refused"),
        (alice, "hmpo", "DeathRegistered", "given"),
        (alice, "dvla", "BirthRegistered", "given"),  # another event type: not asked about
        (bob, "dvla", "DeathRegistered", "refused"),
        (carol, "dvla", "DeathRegistered", "given"),  # not asked about
    ]
    for subject, agency, event_type, choice in history:
        await pool.execute(
            "INSERT INTO consent_record (subject_id, agency, event_type, choice, recorded_by)"
            " VALUES ($1, $2, $3, $4, 'citizen')",
            subject,
            agency,
            event_type,
            choice,
        )
    wanted = [(alice, "DeathRegistered"), (bob, "DeathRegistered"), (bob, "AddressChanged")]
    found = await current_consent(pool, wanted)
    assert found == {
        (alice, "DeathRegistered"): {"dvla": "withdrawn", "hmpo": "given"},
        (bob, "DeathRegistered"): {"dvla": "refused"},
    }
    view = await pool.fetch(
        "SELECT subject_id, event_type, agency, choice FROM current_consent"
        " WHERE subject_id = ANY($1::text[]) AND event_type = 'DeathRegistered' AND subject_id <> $2",
        [alice, bob, carol],
        carol,
    )
    assert found == {
        (s, t): {r["agency"]: r["choice"] for r in view if (r["subject_id"], r["event_type"]) == (s, t)}
        for s, t in {(r["subject_id"], r["event_type"]) for r in view}
    }
