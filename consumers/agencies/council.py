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

A batch's deaths are applied set-wise (``consumers.agencies.deaths``): a run of
them takes five statements (the households, locked; who each death finds there;
leaving; the register; the discounts).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

import asyncpg

from consumers.agencies import delivery
from consumers.agencies.deaths import DeathsSetWise
from consumers.reference import apply_life_event
from consumers.sdk import DeliveredEvent, RejectEvent
from schemas import models

Departure = Literal["died", "moved away"]
ADULT_AGE = 18
NO_HOUSEHOLD = "the council holds no household at the deceased's last address"
NO_RECORD_OF_DECEASED = "the council holds no record of the deceased at their last address"
AMBIGUOUS = "more than one resident at the address matches; the record needs checking by hand"


def adult_on(person: models.Person, on: date) -> bool:
    """Whether ``person`` is an adult on ``on``; someone of unknown age counts as one
    (which the council would check by hand)."""
    born = person.date_of_birth
    if born is None:
        return True
    age = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return age >= ADULT_AGE


@dataclass(frozen=True)
class ResidentDeath:
    """A death as a council finds the resident: at the last address, by name."""

    event_id: uuid.UUID
    last_address: models.Address
    deceased: models.Person | None  # None: outside the council's areas, nothing to read
    died_on: date | None


def _each(death: ResidentDeath) -> Hashable:
    return death.event_id  # CouncilHandler._depart_on_deaths applies a run in turn itself


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

    async def handle_batch(
        self, events: Sequence[DeliveredEvent], conn: asyncpg.Connection
    ) -> Mapping[str, str]:
        set_wise = DeathsSetWise(self, self._read_death, self._depart_on_deaths, _each)
        return await set_wise.handle_batch(events, conn)

    def covers(self, address: models.Address) -> bool:
        return address.local_authority in self.local_authorities

    def _read_death(self, event: DeliveredEvent) -> ResidentDeath:
        last_address = delivery.address(event, "last_address")
        if not self.covers(last_address):
            return ResidentDeath(delivery.event_uuid(event), last_address, None, None)
        deceased = delivery.person(event, "deceased")
        died_on = delivery.day(event, "date_of_death")
        return ResidentDeath(delivery.event_uuid(event), last_address, deceased, died_on)

    async def _depart_on_deaths(
        self, conn: asyncpg.Connection, deaths: list[ResidentDeath]
    ) -> dict[str, str]:
        """``_death`` for a run of deaths, in five statements; returns the rejections
        (event id → reason). A death only marks residents left and electors removed,
        and finding a household or a person reads nothing else, so what the run reads
        at once is what each death would find in turn, less what an earlier death in
        the run marked, which the walk below takes away."""
        held = [(at, d) for at, d in enumerate(deaths) if d.deceased is not None]
        households = await _households_at(conn, self.council, [(at, d.last_address) for at, d in held])
        found = await _people_in(
            conn, [(at, households[at], d.deceased) for at, d in held if at in households and d.deceased]
        )
        rejected: dict[str, str] = {}
        left: dict[int, date] = {}  # resident id → died on
        removed: dict[int, date] = {}  # elector id → died on
        touched: set[int] = set()
        for at, death in held:
            assert death.died_on is not None  # read with the deceased
            if at not in households:
                rejected[str(death.event_id)] = NO_HOUSEHOLD
                continue
            present_ids, registered_ids, known = found[at]
            present = [r for r in present_ids if r not in left]
            if len(present) > 1:
                rejected[str(death.event_id)] = AMBIGUOUS
                continue
            still_registered = [e for e in registered_ids if e not in removed]
            if not (present or still_registered or known):
                rejected[str(death.event_id)] = NO_RECORD_OF_DECEASED
                continue
            left.update((r, death.died_on) for r in present)
            removed.update((e, death.died_on) for e in still_registered)
            touched.add(households[at])
        await _mark_all_left(conn, left, "died")
        await _remove_all_from_register(conn, removed, "died")
        if touched:
            await recompute_discounts(conn, sorted(touched))
        return rejected

    async def _death(self, event: DeliveredEvent, conn: asyncpg.Connection) -> None:
        last_address = delivery.address(event, "last_address")
        if not self.covers(last_address):
            return
        deceased = delivery.person(event, "deceased")
        died_on = delivery.day(event, "date_of_death")
        household = await household_at(conn, self.council, last_address)
        if household is None:
            raise RejectEvent(NO_HOUSEHOLD)
        if not await _depart(conn, household, deceased, died_on, "died"):
            raise RejectEvent(NO_RECORD_OF_DECEASED)
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
        raise RejectEvent(AMBIGUOUS)
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
# The same, for a person given as d.given_names, d.family_name, d.born:
_SAME_PERSON_OF_D = (
    "agency.same_name(given_names, family_name, d.given_names, d.family_name)"
    " AND (date_of_birth IS NULL OR d.born IS NULL OR date_of_birth = d.born)"
)
_SAME_ELECTOR_OF_D = "agency.same_name(given_names, family_name, d.given_names, d.family_name)"


async def household_at(conn: asyncpg.Connection, council: str, address: models.Address) -> int | None:
    """The council's household at ``address``, if it holds one (locked)."""
    return (await _households_at(conn, council, [(0, address)])).get(0)


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
    await recompute_discounts(conn, [household])


async def recompute_discounts(conn: asyncpg.Connection, households: list[int]) -> None:
    await conn.execute(
        "UPDATE agency.council_household h SET single_person_discount = ("
        "   SELECT count(*) = 1 FROM agency.council_resident r"
        "    WHERE r.household_id = h.id AND r.adult AND r.left_on IS NULL)"
        " WHERE h.id = ANY($1::bigint[])",
        households,
    )


async def _households_at(
    conn: asyncpg.Connection, council: str, addresses: list[tuple[int, models.Address]]
) -> dict[int, int]:
    """The council's household at each address (by its place in ``addresses``), locked,
    in one statement; addresses it holds no household at are left out."""
    if not addresses:
        return {}
    rows = await conn.fetch(
        "SELECT d.at, h.id"
        "  FROM jsonb_to_recordset($2::jsonb) AS d(at int, lines text[], postcode text, uprn text)"
        " CROSS JOIN LATERAL ("
        "   SELECT id FROM agency.council_household"
        "    WHERE council = $1"
        # What agency.same_address needs, in a form the indexes serve:
        "      AND (uprn = d.uprn OR (postcode = d.postcode"
        "           AND agency.match_key(address_lines[1]) = agency.match_key(d.lines[1])))"
        "      AND agency.same_address(address_lines, postcode, uprn, d.lines, d.postcode, d.uprn)"
        "    ORDER BY id LIMIT 1 FOR UPDATE) AS h",
        council,
        json.dumps(
            [{"at": at, "lines": a.lines, "postcode": a.postcode, "uprn": a.uprn} for at, a in addresses]
        ),
    )
    return {row["at"]: row["id"] for row in rows}


async def _people_in(
    conn: asyncpg.Connection, people: list[tuple[int, int, models.Person]]
) -> dict[int, tuple[list[int], list[int], bool]]:
    """For each (place in a run, household, person) in one statement: the residents
    present there who match (``_present_residents``), the electors registered there
    who match, and whether the council ever knew them there (``_ever_known``). The
    rows need no lock of their own: whoever changes them holds the household's."""
    if not people:
        return {}
    rows = await conn.fetch(
        "SELECT d.at,"
        "  ARRAY(SELECT id FROM agency.council_resident"
        f"        WHERE household_id = d.household AND left_on IS NULL AND {_SAME_PERSON_OF_D}"
        "        ORDER BY id) AS present,"
        "  ARRAY(SELECT id FROM agency.electoral_register"
        f"        WHERE household_id = d.household AND status = 'registered' AND {_SAME_ELECTOR_OF_D}"
        "        ORDER BY id) AS registered,"
        "  EXISTS (SELECT 1 FROM agency.council_resident"
        f"          WHERE household_id = d.household AND {_SAME_PERSON_OF_D})"
        "   OR EXISTS (SELECT 1 FROM agency.electoral_register"
        f"              WHERE household_id = d.household AND {_SAME_ELECTOR_OF_D}) AS known"
        "  FROM jsonb_to_recordset($1::jsonb)"
        "       AS d(at int, household bigint, given_names text, family_name text, born date)",
        json.dumps(
            [
                {
                    "at": at,
                    "household": household,
                    "given_names": p.given_names,
                    "family_name": p.family_name,
                    "born": None if p.date_of_birth is None else p.date_of_birth.isoformat(),
                }
                for at, household, p in people
            ]
        ),
    )
    return {row["at"]: (list(row["present"]), list(row["registered"]), row["known"]) for row in rows}


async def _mark_all_left(conn: asyncpg.Connection, left: dict[int, date], because: Departure) -> None:
    if left:
        await conn.execute(
            "UPDATE agency.council_resident r SET left_on = l.on_day, left_because = $3"
            "  FROM unnest($1::bigint[], $2::date[]) AS l(id, on_day) WHERE r.id = l.id",
            list(left),
            list(left.values()),
            because,
        )


async def _remove_all_from_register(
    conn: asyncpg.Connection, removed: dict[int, date], because: Departure
) -> None:
    if removed:
        await conn.execute(
            "UPDATE agency.electoral_register e"
            "   SET status = 'removed', removed_on = l.on_day, removal_reason = $3"
            "  FROM unnest($1::bigint[], $2::date[]) AS l(id, on_day) WHERE e.id = l.id",
            list(removed),
            list(removed.values()),
            because,
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
