"""A council's reference consumer: council-tax households, who lives in them, and
the electoral register.

Each council is configured with its local authorities' GSS codes (Leeds:
E08000035); an address intake placed in another authority (the event's
``local_authority``), or could not place, is another council's business, and an
event about one is applied with no effect here.

- DeathRegistered at an address the council holds: the deceased leaves the
  household on the date of death and comes off the electoral register there.
- AddressChanged, moving out of a household the council holds: the person, and
  everyone moving with them, leaves it and comes off the register there.
  Moving in to an address in the council's areas: they join the household at
  the new address (a new household when the council holds none there), and the
  adults among them join the register.
- After either, each household touched gets the single-person discount (25% off
  council tax) when exactly one adult lives there, and loses it otherwise.
- Anything else (corrections, voids) is applied with no effect.

Addresses match by UPRN when both sides have one, else by postcode and first
line; people by surname and first forename, and date of birth when both sides
know it (see ``agency.same_address`` and ``agency.same_name``). Someone who
already left is left as they are: the event is applied without change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

import asyncpg

from consumers.agencies import delivery
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

Departure = Literal["died", "moved away"]
ADULT_AGE = 18


def adult_on(person: models.Person, on: date) -> bool:
    """Whether ``person`` is an adult on ``on``; someone of unknown age counts as one
    (which the council would check by hand)."""
    born = person.date_of_birth
    if born is None:
        return True
    age = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return age >= ADULT_AGE


@dataclass(frozen=True)
class CouncilHandler:
    """The handler of one council (``agency`` code, e.g. council-leeds)."""

    council: str
    local_authorities: frozenset[str]  # GSS codes

    async def __call__(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        match event.event_type:
            case "DeathRegistered":
                await self._death(event, conn)
            case "AddressChanged":
                await self._move(event, conn)
            case _:
                await apply_life_event(event, conn)

    def covers(self, address: models.Address) -> bool:
        return address.local_authority in self.local_authorities

    async def _death(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        last_address = delivery.address(event, "last_address")
        if not self.covers(last_address):
            return
        deceased = delivery.person(event, "deceased")
        died_on = delivery.day(event, "date_of_death")
        household = await household_at(conn, self.council, last_address)
        if household is None:
            raise RejectEvent("the council holds no household at the deceased's last address")
        if not await _depart(conn, household, deceased, died_on, "died"):
            raise RejectEvent("the council holds no record of the deceased at their last address")
        await recompute_discount(conn, household)

    async def _move(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        movers = [delivery.person(event, "person"), *delivery.companions(event)]
        moved_on = delivery.day(event, "effective_date")
        new_address = delivery.address(event, "new_address")
        old_address = delivery.address_if_delivered(event, "old_address")
        moving_in = self.covers(new_address)
        if old_address is not None and self.covers(old_address):
            known = await _move_out(conn, self.council, old_address, movers, moved_on)
            if not known and not moving_in:
                raise RejectEvent("the council holds no record of the person at their previous address")
        if moving_in:
            await _move_in(conn, self.council, new_address, movers, moved_on)


async def _move_out(
    conn: asyncpg.Connection, council: str, address: models.Address, movers: list[models.Person], on: date
) -> bool:
    """Everyone in ``movers`` leaves the household at ``address``; False when the council
    holds no record of the first of them (the person moving) there."""
    household = await household_at(conn, council, address)
    if household is None:
        return False
    known = [await _depart(conn, household, mover, on, "moved away") for mover in movers]
    await recompute_discount(conn, household)
    return known[0]


async def _move_in(
    conn: asyncpg.Connection, council: str, address: models.Address, movers: list[models.Person], on: date
) -> None:
    household = await household_at(conn, council, address)
    if household is None:
        household = await new_household(conn, council, address)
    for mover in movers:
        await join(conn, household, mover, on)
    await recompute_discount(conn, household)


async def _depart(
    conn: asyncpg.Connection, household: int, person: models.Person, on: date, because: Departure
) -> bool:
    """``person`` leaves the household and comes off the register there. False when
    the council never knew them at this address; leaving twice changes nothing."""
    present = await _present_residents(conn, household, person)
    if len(present) > 1:
        raise RejectEvent("more than one resident at the address matches; the record needs checking by hand")
    for resident in present:
        await _mark_left(conn, resident, on, because)
    removed = await _remove_from_register(conn, household, person, on, because)
    return bool(present) or removed or await _ever_known(conn, household, person)


async def join(conn: asyncpg.Connection, household: int, person: models.Person, on: date) -> None:
    """``person`` lives in the household from ``on`` and, if an adult, is on the register
    there (in practice the council invites them to register). Joining twice changes nothing."""
    adult = adult_on(person, on)
    if not await _present_residents(conn, household, person):
        await add_resident(conn, household, person, adult, on)
    if adult and not await _registered(conn, household, person):
        await register_elector(conn, household, person, on)


# --- queries -----------------------------------------------------------------------------------

_SAME_PERSON = (
    "agency.same_name(given_names, family_name, $2, $3)"
    " AND (date_of_birth IS NULL OR $4::date IS NULL OR date_of_birth = $4)"
)
_SAME_ELECTOR = "agency.same_name(given_names, family_name, $2, $3)"


async def household_at(conn: asyncpg.Connection, council: str, address: models.Address) -> int | None:
    """The council's household at ``address``, if it holds one."""
    household: int | None = await conn.fetchval(
        "SELECT id FROM agency.council_household"
        " WHERE council = $1"
        # What agency.same_address needs, in a form the indexes serve:
        "   AND (uprn = $4 OR (postcode = $3 AND agency.match_key(address_lines[1]) = agency.match_key($5)))"
        "   AND agency.same_address(address_lines, postcode, uprn, $2, $3, $4)"
        " ORDER BY id LIMIT 1 FOR UPDATE",
        council,
        address.lines,
        address.postcode,
        address.uprn,
        address.lines[0],
    )
    return household


async def new_household(conn: asyncpg.Connection, council: str, address: models.Address) -> int:
    household: int = await conn.fetchval(
        "INSERT INTO agency.council_household (council, address_lines, town, postcode, uprn)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING id",
        council,
        address.lines,
        address.town,
        address.postcode,
        address.uprn,
    )
    return household


async def recompute_discount(conn: asyncpg.Connection, household: int) -> None:
    await conn.execute(
        "UPDATE agency.council_household h SET single_person_discount = ("
        "   SELECT count(*) = 1 FROM agency.council_resident r"
        "    WHERE r.household_id = h.id AND r.adult AND r.left_on IS NULL)"
        " WHERE h.id = $1",
        household,
    )


async def _present_residents(conn: asyncpg.Connection, household: int, person: models.Person) -> list[int]:
    rows = await conn.fetch(
        "SELECT id FROM agency.council_resident"
        f" WHERE household_id = $1 AND left_on IS NULL AND {_SAME_PERSON} FOR UPDATE",
        household,
        person.given_names,
        person.family_name,
        person.date_of_birth,
    )
    return [row["id"] for row in rows]


async def _ever_known(conn: asyncpg.Connection, household: int, person: models.Person) -> bool:
    known: bool = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM agency.council_resident WHERE household_id = $1 AND {_SAME_PERSON})"
        "    OR EXISTS (SELECT 1 FROM agency.electoral_register"
        "                WHERE household_id = $1 AND agency.same_name(given_names, family_name, $2, $3))",
        household,
        person.given_names,
        person.family_name,
        person.date_of_birth,
    )
    return known


async def add_resident(
    conn: asyncpg.Connection, household: int, person: models.Person, adult: bool, on: date | None
) -> None:
    await conn.execute(
        "INSERT INTO agency.council_resident"
        " (household_id, given_names, family_name, date_of_birth, adult, moved_in_on)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        household,
        person.given_names,
        person.family_name,
        person.date_of_birth,
        adult,
        on,
    )


async def _mark_left(conn: asyncpg.Connection, resident: int, on: date, because: Departure) -> None:
    await conn.execute(
        "UPDATE agency.council_resident SET left_on = $2, left_because = $3 WHERE id = $1",
        resident,
        on,
        because,
    )


async def _registered(conn: asyncpg.Connection, household: int, person: models.Person) -> bool:
    registered: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM agency.electoral_register"
        f"               WHERE household_id = $1 AND status = 'registered' AND {_SAME_ELECTOR})",
        household,
        person.given_names,
        person.family_name,
    )
    return registered


async def register_elector(
    conn: asyncpg.Connection, household: int, person: models.Person, on: date | None
) -> None:
    await conn.execute(
        "INSERT INTO agency.electoral_register (household_id, given_names, family_name, registered_on)"
        " VALUES ($1, $2, $3, $4)",
        household,
        person.given_names,
        person.family_name,
        on,
    )


async def _remove_from_register(
    conn: asyncpg.Connection, household: int, person: models.Person, on: date, because: Departure
) -> bool:
    removed = await conn.fetch(
        "UPDATE agency.electoral_register SET status = 'removed', removed_on = $4, removal_reason = $5"
        f" WHERE household_id = $1 AND status = 'registered' AND {_SAME_ELECTOR} RETURNING id",
        household,
        person.given_names,
        person.family_name,
        on,
        because,
    )
    return bool(removed)
