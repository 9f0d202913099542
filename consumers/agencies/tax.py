"""HMRC's reference consumer: tax records, found by National Insurance number.

- DeathRegistered: the record is closed on the date of death. A record already
  closed is left as it is (the event is still applied).
- AddressChanged: the record takes the new address, unless it already holds one
  that took effect later (events can arrive out of order).
- EventVoided of a death: the record that death closed is reopened.
- EventCorrected of a death's NINO: the death moves to the right taxpayer. The
  record it closed (someone else's, whose NINO was wrongly given) is reopened, and
  the record of the corrected NINO is closed on the same date.
- Anything else (a birth, another correction) is applied with no effect.

Without the NINO, or with no record for it, the event is rejected.

``TAX`` applies a batch set-wise (``consumers.agencies.deaths``): each run of deaths
of different people takes two statements (the records, locked; the closures).
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg

from consumers.agencies import delivery
from consumers.agencies.deaths import Death, DeathsSetWise, by_nino, read_death
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

NO_RECORD = "no tax record for this National Insurance number"


async def handle(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    match event.event_type:
        case "DeathRegistered":
            await _close_on_death(event, conn)
        case "AddressChanged":
            await _change_address(event, conn)
        case "EventCorrected" if (correction := delivery.nino_correction(event)) is not None:
            await _move_death(event, correction.nino, conn)
        case "EventVoided":
            voided_id, voided_type = delivery.voided(event)
            if voided_type == "DeathRegistered":
                await _reopen(conn, voided_id)
        case _:
            await apply_life_event(event, conn)


async def _close_on_death(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    nino = delivery.nino(event)
    died_on = delivery.day(event, "date_of_death")
    status = await _status(conn, nino)
    if status is None:
        raise RejectEvent(NO_RECORD)
    if status == "open":
        await _close(conn, nino, died_on, delivery.event_uuid(event))


async def _close_on_deaths(conn: asyncpg.Connection, deaths: list[Death]) -> dict[str, str]:
    """``_close_on_death`` for deaths of different people, in two statements; returns the
    rejections (event id → reason)."""
    open_now = {
        row["nino"]: row["status"]
        for row in await conn.fetch(
            "SELECT nino, status FROM agency.tax_record"
            " WHERE nino = ANY($1::text[]) ORDER BY nino FOR UPDATE",
            [d.nino for d in deaths],
        )
    }
    closing = [d for d in deaths if open_now.get(d.nino) == "open"]
    if closing:
        await conn.execute(
            "UPDATE agency.tax_record t"
            "   SET status = 'closed', closed_on = c.died_on, closed_by_event = c.event_id"
            "  FROM unnest($1::text[], $2::date[], $3::uuid[]) AS c(nino, died_on, event_id)"
            " WHERE t.nino = c.nino",
            [d.nino for d in closing],
            [d.died_on for d in closing],
            [d.event_id for d in closing],
        )
    return {str(d.event_id): NO_RECORD for d in deaths if d.nino not in open_now}


async def _change_address(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    nino = delivery.nino(event)
    new_address = delivery.address(event, "new_address")
    moved_on = delivery.day(event, "effective_date")
    if await _status(conn, nino) is None:
        raise RejectEvent(NO_RECORD)
    await _move(conn, nino, new_address, moved_on)


async def _move_death(event: DeliveredEvent, nino: str | None, conn: asyncpg.Connection) -> None:
    corrected_id, corrected_type = delivery.corrected(event)
    if corrected_type != "DeathRegistered":
        return await apply_life_event(event, conn)  # a birth or move holds nothing to move here
    died_on = await conn.fetchval(
        "SELECT closed_on FROM agency.tax_record WHERE closed_by_event = $1 FOR UPDATE", corrected_id
    )
    if died_on is None:  # the death was rejected or is voided: it closed no record
        raise RejectEvent("no tax record was closed by the corrected death")
    await _reopen(conn, corrected_id)
    if nino is not None:  # None: the NINO was removed, and HMRC cannot tell whose death it is
        status = await _status(conn, nino)
        if status is None:
            raise RejectEvent(NO_RECORD)  # undoes the reopening too: the receipt says why
        if status == "open":
            await _close(conn, nino, died_on, corrected_id)
    return None


# --- queries -----------------------------------------------------------------------------------


async def _status(conn: asyncpg.Connection, nino: str) -> str | None:
    status: str | None = await conn.fetchval(
        "SELECT status FROM agency.tax_record WHERE nino = $1 FOR UPDATE", nino
    )
    return status


async def _close(conn: asyncpg.Connection, nino: str, died_on: date, event_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE agency.tax_record SET status = 'closed', closed_on = $2, closed_by_event = $3"
        " WHERE nino = $1",
        nino,
        died_on,
        event_id,
    )


async def _reopen(conn: asyncpg.Connection, closed_by_event: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE agency.tax_record SET status = 'open', closed_on = NULL, closed_by_event = NULL"
        " WHERE closed_by_event = $1",
        closed_by_event,
    )


async def _move(conn: asyncpg.Connection, nino: str, address: models.Address, moved_on: date) -> None:
    await conn.execute(
        "UPDATE agency.tax_record"
        "   SET address_lines = $2, town = $3, postcode = $4, uprn = $5, address_from = $6"
        " WHERE nino = $1 AND (address_from IS NULL OR address_from <= $6)",
        nino,
        address.lines,
        address.town,
        address.postcode,
        address.uprn,
        moved_on,
    )


TAX = DeathsSetWise(handle, read_death, _close_on_deaths, by_nino)  # HMRC's handler, of one event or a batch
