"""DVLA's reference consumer: driving licences.

DVLA is not sent the National Insurance number, so it finds the licence as it
does in practice: by surname, first forename and date of birth; when the date of
birth was not delivered, by surname, first forename and the postcode the
licence holds (the deceased's last address, or the previous address of someone
moving, where delivered). No match, or more than one, rejects the event.

- DeathRegistered: the licence is cancelled on the date of death (holder died).
  A licence already cancelled is left as it is (the event is still applied).
- AddressChanged: the licence takes the new address, unless it already holds
  one that took effect later.
- EventVoided of a death: the licence that death cancelled is valid again.
- Anything else is applied with no effect.
"""

from __future__ import annotations

import uuid
from datetime import date

import asyncpg

from consumers.agencies import delivery
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

HOLDER_DIED = "holder died"


async def handle(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    match event.event_type:
        case "DeathRegistered":
            await _cancel_on_death(event, conn)
        case "AddressChanged":
            await _change_address(event, conn)
        case "EventVoided":
            voided_id, voided_type = delivery.voided(event)
            if voided_type == "DeathRegistered":
                await _reinstate(conn, voided_id)
        case _:
            await apply_life_event(event, conn)


async def _cancel_on_death(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    deceased = delivery.person(event, "deceased")
    died_on = delivery.day(event, "date_of_death")
    licence = await _matching_licence(conn, deceased, delivery.address_if_delivered(event, "last_address"))
    if licence["status"] == "valid":
        await _cancel(conn, licence["driver_number"], died_on, delivery.event_uuid(event))


async def _change_address(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    holder = delivery.person(event, "person")
    new_address = delivery.address(event, "new_address")
    moved_on = delivery.day(event, "effective_date")
    licence = await _matching_licence(conn, holder, delivery.address_if_delivered(event, "old_address"))
    await _move(conn, licence["driver_number"], new_address, moved_on)


async def _matching_licence(
    conn: asyncpg.Connection, holder: models.Person, held_address: models.Address | None
) -> asyncpg.Record:
    """The one licence for ``holder``; ``held_address`` is the address the licence
    would hold, used only when the date of birth is unknown."""
    if holder.date_of_birth is not None:
        found = await _by_name_and_birth(conn, holder, holder.date_of_birth)
        missing = "no driving licence matches the name and date of birth"
    elif held_address is not None:
        found = await _by_name_and_postcode(conn, holder, held_address.postcode)
        missing = "no driving licence matches the name and postcode"
    else:
        raise RejectEvent(
            "the driving licence cannot be found without the date of birth or the address it is held at"
        )
    if not found:
        raise RejectEvent(missing)
    if len(found) > 1:
        raise RejectEvent("more than one driving licence matches; the licence needs checking by hand")
    return found[0]


# --- queries -----------------------------------------------------------------------------------

_COLUMNS = "SELECT driver_number, status FROM agency.driving_licence"


async def _by_name_and_birth(
    conn: asyncpg.Connection, holder: models.Person, born: date
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{_COLUMNS} WHERE agency.match_key(family_name) = agency.match_key($2) AND date_of_birth = $3"
        "   AND agency.same_name(given_names, family_name, $1, $2) FOR UPDATE",
        holder.given_names,
        holder.family_name,
        born,
    )
    return rows


async def _by_name_and_postcode(
    conn: asyncpg.Connection, holder: models.Person, postcode: str
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"{_COLUMNS} WHERE agency.match_key(family_name) = agency.match_key($2) AND postcode = $3"
        "   AND agency.same_name(given_names, family_name, $1, $2) FOR UPDATE",
        holder.given_names,
        holder.family_name,
        postcode,
    )
    return rows


async def _cancel(conn: asyncpg.Connection, driver_number: str, died_on: date, event_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE agency.driving_licence"
        "   SET status = 'cancelled', cancelled_on = $2, cancellation_reason = $3, cancelled_by_event = $4"
        " WHERE driver_number = $1",
        driver_number,
        died_on,
        HOLDER_DIED,
        event_id,
    )


async def _reinstate(conn: asyncpg.Connection, cancelled_by_event: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE agency.driving_licence"
        "   SET status = 'valid', cancelled_on = NULL, cancellation_reason = NULL, cancelled_by_event = NULL"
        " WHERE cancelled_by_event = $1",
        cancelled_by_event,
    )


async def _move(
    conn: asyncpg.Connection, driver_number: str, address: models.Address, moved_on: date
) -> None:
    await conn.execute(
        "UPDATE agency.driving_licence"
        "   SET address_lines = $2, town = $3, postcode = $4, uprn = $5, address_from = $6"
        " WHERE driver_number = $1 AND (address_from IS NULL OR address_from <= $6)",
        driver_number,
        address.lines,
        address.town,
        address.postcode,
        address.uprn,
        moved_on,
    )
