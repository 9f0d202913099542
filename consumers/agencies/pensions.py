"""DWP's reference consumer: state pension awards, found by National Insurance number.

- DeathRegistered: the award stops on the date of death, and what was paid for
  the days after it becomes an overpayment to recover from the estate. An award
  already stopped is left as it is (the event is still applied).
- EventVoided of a death: the award that death stopped is back in payment.
- EventCorrected of a death's NINO: the award that death stopped (someone else's,
  whose NINO was wrongly given) is back in payment, and the corrected NINO's award
  stops on the same date instead.
- Anything else is applied with no effect: DWP is sent births too (for child
  benefit), which a pension award has no business with.

Without the NINO, or with no award for it, the event is rejected.

``PENSIONS`` applies a batch set-wise (``consumers.agencies.deaths``): each run of
deaths of different people takes two statements (the awards, locked; the stops).
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg

from consumers.agencies import delivery
from consumers.agencies.deaths import Death, DeathsSetWise, by_nino, read_death
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent

NO_AWARD = "no pension award for this National Insurance number"


def overpayment_pence(weekly_amount_pence: int, paid_until: date, died_on: date) -> int:
    """What was paid for the days from the day after the death up to ``paid_until``,
    at a seventh of the weekly amount a day, rounded down to the penny so that no
    more is asked back than was paid."""
    days_paid_after_death = max(0, (paid_until - died_on).days)
    return weekly_amount_pence * days_paid_after_death // 7


async def handle(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    match event.event_type:
        case "DeathRegistered":
            await _stop_on_death(event, conn)
        case "EventCorrected" if (correction := delivery.nino_correction(event)) is not None:
            await _move_death(event, correction.nino, conn)
        case "EventVoided":
            voided_id, voided_type = delivery.voided(event)
            if voided_type == "DeathRegistered":
                await _resume(conn, voided_id)
        case _:
            await apply_life_event(event, conn)


async def _stop_on_deaths(conn: asyncpg.Connection, deaths: list[Death]) -> dict[str, str]:
    """``_stop_on_death`` for deaths of different people, in two statements; returns the
    rejections (event id → reason)."""
    if not deaths:
        return {}
    awards = {
        row["nino"]: row
        for row in await conn.fetch(
            "SELECT nino, status, weekly_amount_pence, paid_until FROM agency.pension_award"
            " WHERE nino = ANY($1::text[]) ORDER BY nino FOR UPDATE",
            [d.nino for d in deaths],
        )
    }
    stops: list[tuple[str, date, int, uuid.UUID]] = []
    rejected: dict[str, str] = {}
    for death in deaths:
        award = awards.get(death.nino)
        if award is None:
            rejected[str(death.event_id)] = NO_AWARD
        elif award["status"] == "in_payment":
            owed = overpayment_pence(award["weekly_amount_pence"], award["paid_until"], death.died_on)
            stops.append((death.nino, death.died_on, owed, death.event_id))
    if stops:
        await conn.execute(
            "UPDATE agency.pension_award a"
            "   SET status = 'stopped', stopped_on = s.died_on, overpayment_pence = s.owed,"
            "       stopped_by_event = s.event_id"
            "  FROM unnest($1::text[], $2::date[], $3::int[], $4::uuid[])"
            "       AS s(nino, died_on, owed, event_id)"
            " WHERE a.nino = s.nino",
            *map(list, zip(*stops, strict=True)),
        )
    return rejected


async def _stop_on_death(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    nino = delivery.nino(event)
    died_on = delivery.day(event, "date_of_death")
    award = await _award(conn, nino)
    if award is None:
        raise RejectEvent(NO_AWARD)
    if award["status"] == "in_payment":
        owed = overpayment_pence(award["weekly_amount_pence"], award["paid_until"], died_on)
        await _stop(conn, nino, died_on, owed, delivery.event_uuid(event))


async def _move_death(event: DeliveredEvent, nino: str | None, conn: asyncpg.Connection) -> None:
    corrected_id, corrected_type = delivery.corrected(event)
    if corrected_type != "DeathRegistered":
        return await apply_life_event(event, conn)  # a birth or move holds nothing to move here
    died_on = await conn.fetchval(
        "SELECT stopped_on FROM agency.pension_award WHERE stopped_by_event = $1 FOR UPDATE", corrected_id
    )
    if died_on is None:  # the death was rejected or is voided: it stopped no award
        raise RejectEvent("no pension award was stopped by the corrected death")
    await _resume(conn, corrected_id)
    if nino is not None:  # None: the NINO was removed, and DWP cannot tell whose death it is
        award = await _award(conn, nino)
        if award is None:
            raise RejectEvent(NO_AWARD)  # undoes the resumption too: the receipt says why
        if award["status"] == "in_payment":
            owed = overpayment_pence(award["weekly_amount_pence"], award["paid_until"], died_on)
            await _stop(conn, nino, died_on, owed, corrected_id)
    return None


# --- queries -----------------------------------------------------------------------------------


async def _award(conn: asyncpg.Connection, nino: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT status, weekly_amount_pence, paid_until FROM agency.pension_award WHERE nino = $1 FOR UPDATE",
        nino,
    )


async def _stop(
    conn: asyncpg.Connection, nino: str, died_on: date, overpayment: int, event_id: uuid.UUID
) -> None:
    await conn.execute(
        "UPDATE agency.pension_award"
        "   SET status = 'stopped', stopped_on = $2, overpayment_pence = $3, stopped_by_event = $4"
        " WHERE nino = $1",
        nino,
        died_on,
        overpayment,
        event_id,
    )


async def _resume(conn: asyncpg.Connection, stopped_by_event: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE agency.pension_award"
        "   SET status = 'in_payment', stopped_on = NULL, overpayment_pence = 0, stopped_by_event = NULL"
        " WHERE stopped_by_event = $1",
        stopped_by_event,
    )


PENSIONS = DeathsSetWise(
    handle, read_death, _stop_on_deaths, by_nino
)  # DWP's handler, of one event or a batch
