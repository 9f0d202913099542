"""The order router.plan reads in, on which the citizen's withdrawal guarantee rests
(the router and replay both read through it; the race itself: test_withdrawal_race.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import asyncpg

from router.messages import Incoming
from router.plan import read_inputs
from router.rules import RoutableEvent
from router.store import OriginalEvent


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
    assert "current_consent" in steps[3] and len(steps) == 4
    subjects, types = conn.asked[3][1]
    # A withdrawal made for the death is honoured for its correction, whatever the correction claims.
    assert sorted(zip(subjects, types, strict=True)) == [
        ("n-subject", "BirthRegistered"),
        ("n-subject", "DeathRegistered"),
    ]
    assert inputs.now == datetime(2026, 12, 6, tzinfo=UTC)
