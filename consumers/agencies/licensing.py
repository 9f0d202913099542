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
- ServicesRequested after a death, with the licence number the informant gave: that
  licence is cancelled on the date of death, if it is the named person's (surname and
  forename match); a number DVLA does not know, or another person's, rejects the request.
- Anything else is applied with no effect.

``LICENSING`` applies a batch set-wise (``consumers.agencies.deaths``): a run of
deaths takes two statements (the licences each matches, locked; the cancellations),
and a third when some deaths came without a date of birth.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import date

import asyncpg

from consumers.agencies import delivery
from consumers.agencies.deaths import DeathsSetWise
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

HOLDER_DIED = "holder died"
NO_MATCH_BY_BIRTH = "no driving licence matches the name and date of birth"
NO_MATCH_BY_POSTCODE = "no driving licence matches the name and postcode"
UNFINDABLE = "the driving licence cannot be found without the date of birth or the address it is held at"
AMBIGUOUS = "more than one driving licence matches; the licence needs checking by hand"
NO_SUCH_LICENCE = "no driving licence has the number given"
ANOTHER_HOLDER = "the driving licence with the number given is another person's"


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
        case "ServicesRequested" if delivery.text(event, "requested_event_type") == "DeathRegistered":
            await _cancel_by_number(event, conn)
        case _:
            await apply_life_event(event, conn)


@dataclass(frozen=True)
class HolderDeath:
    """A death as DVLA finds the licence: by name, and date of birth or else postcode."""

    event_id: uuid.UUID
    holder: models.Person
    held_postcode: str | None  # the last address's, when delivered
    died_on: date

    @property
    def no_match(self) -> str:
        return NO_MATCH_BY_BIRTH if self.holder.date_of_birth is not None else NO_MATCH_BY_POSTCODE


def _read_death(event: DeliveredEvent) -> HolderDeath:
    deceased = delivery.person(event, "deceased")
    died_on = delivery.day(event, "date_of_death")
    held_address = delivery.address_if_delivered(event, "last_address")
    if deceased.date_of_birth is None and held_address is None:
        raise RejectEvent(UNFINDABLE)
    postcode = None if held_address is None else held_address.postcode
    return HolderDeath(delivery.event_uuid(event), deceased, postcode, died_on)


def _each(death: HolderDeath) -> Hashable:
    return death.event_id  # _cancel_on_deaths applies a run in turn itself


async def _cancel_on_death(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    deceased = delivery.person(event, "deceased")
    died_on = delivery.day(event, "date_of_death")
    licence = await _matching_licence(conn, deceased, delivery.address_if_delivered(event, "last_address"))
    if licence["status"] == "valid":
        await _cancel(conn, licence["driver_number"], died_on, delivery.event_uuid(event))


async def _cancel_by_number(event: DeliveredEvent, conn: asyncpg.Connection) -> None:
    """The informant gave the licence number: that licence, if it is the named person's."""
    holder = delivery.person(event, "person")
    died_on = delivery.day(event, "date_of_death")
    number = delivery.text(event, "driving_licence_number")
    licence = await conn.fetchrow(
        "SELECT driver_number, status,"
        "       agency.same_name(given_names, family_name, $2, $3) AS same_holder"
        "  FROM agency.driving_licence WHERE driver_number = $1 FOR UPDATE",
        number,
        holder.given_names,
        holder.family_name,
    )
    if licence is None:
        raise RejectEvent(NO_SUCH_LICENCE)
    if not licence["same_holder"]:
        raise RejectEvent(ANOTHER_HOLDER)
    if licence["status"] == "valid":
        await _cancel(conn, number, died_on, delivery.event_uuid(event))


async def _cancel_on_deaths(conn: asyncpg.Connection, deaths: list[HolderDeath]) -> dict[str, str]:
    """``_cancel_on_death`` for a run of deaths, in two or three statements; returns the
    rejections (event id → reason). A death only cancels, and matching reads no
    column a cancellation writes, so the matches read at once are those each death
    would find in turn; only the status can differ, when an earlier death in the run
    cancelled the same licence (it then stays as that one left it)."""
    matches = await _licences_of(conn, [(d.holder, d.held_postcode) for d in deaths])
    rejected: dict[str, str] = {}
    cancelled: dict[str, tuple[date, uuid.UUID]] = {}  # by driver number, in order
    for at, death in enumerate(deaths):
        found = matches.get(at, [])
        if not found:
            rejected[str(death.event_id)] = death.no_match
        elif len(found) > 1:
            rejected[str(death.event_id)] = AMBIGUOUS
        elif found[0]["status"] == "valid" and found[0]["driver_number"] not in cancelled:
            cancelled[found[0]["driver_number"]] = (death.died_on, death.event_id)
    if cancelled:
        await conn.execute(
            "UPDATE agency.driving_licence l"
            "   SET status = 'cancelled', cancelled_on = c.died_on, cancellation_reason = $4,"
            "       cancelled_by_event = c.event_id"
            "  FROM unnest($1::text[], $2::date[], $3::uuid[]) AS c(driver_number, died_on, event_id)"
            " WHERE l.driver_number = c.driver_number",
            list(cancelled),
            [died_on for died_on, _ in cancelled.values()],
            [event_id for _, event_id in cancelled.values()],
            HOLDER_DIED,
        )
    return rejected


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
    if holder.date_of_birth is None and held_address is None:
        raise RejectEvent(UNFINDABLE)
    postcode = None if held_address is None else held_address.postcode
    found = (await _licences_of(conn, [(holder, postcode)])).get(0, [])
    missing = NO_MATCH_BY_BIRTH if holder.date_of_birth is not None else NO_MATCH_BY_POSTCODE
    if not found:
        raise RejectEvent(missing)
    if len(found) > 1:
        raise RejectEvent(AMBIGUOUS)
    return found[0]


# --- queries -----------------------------------------------------------------------------------


async def _licences_of(
    conn: asyncpg.Connection, holders: list[tuple[models.Person, str | None]]
) -> dict[int, list[asyncpg.Record]]:
    """The licences each (holder, postcode the licence would hold) matches, by its place
    in ``holders``, locked: by surname, first forename and date of birth where the date
    of birth is known, else by postcode (a statement each, so that each uses its index)."""
    matches: dict[int, list[asyncpg.Record]] = {}
    dated = [(at, h, h.date_of_birth) for at, (h, _) in enumerate(holders) if h.date_of_birth is not None]
    undated = [(at, h, postcode) for at, (h, postcode) in enumerate(holders) if h.date_of_birth is None]
    for column, held_type, group in (("date_of_birth", "date", dated), ("postcode", "text", undated)):
        if not group:
            continue
        rows = await conn.fetch(
            "SELECT d.at, l.driver_number, l.status"
            f"  FROM unnest($1::int[], $2::text[], $3::text[], $4::{held_type}[])"
            "       AS d(at, given_names, family_name, held)"
            "  JOIN agency.driving_licence l"
            f"   ON agency.match_key(l.family_name) = agency.match_key(d.family_name) AND l.{column} = d.held"
            "  AND agency.same_name(l.given_names, l.family_name, d.given_names, d.family_name)"
            " ORDER BY l.driver_number FOR UPDATE OF l",
            [at for at, _, _ in group],
            [holder.given_names for _, holder, _ in group],
            [holder.family_name for _, holder, _ in group],
            [held for _, _, held in group],
        )
        for row in rows:
            matches.setdefault(row["at"], []).append(row)
    return matches


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


LICENSING = DeathsSetWise(handle, _read_death, _cancel_on_deaths, _each)  # DVLA's, of one event or a batch
