"""Creating the reference agencies' records, for the tests and the demo: a tax
record, a pension award, a driving licence, a council household with its
residents and electors. Each leaves a record the agency already holds as it is,
so seeding twice changes nothing.

``conn`` may be a pool or a connection; pass a connection in a transaction to
create several records at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import asyncpg

from consumers.agencies import council
from schemas import models
from schemas.identity_documents import birth_code, surname_code
from schemas.validation import normalise_nino


async def open_tax_record(
    conn: asyncpg.Pool | asyncpg.Connection, nino: str, person: models.Person, address: models.Address
) -> None:
    await conn.execute(
        "INSERT INTO agency.tax_record (nino, given_names, family_name, address_lines, town, postcode, uprn)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (nino) DO NOTHING",
        normalise_nino(nino),
        person.given_names,
        person.family_name,
        address.lines,
        address.town,
        address.postcode,
        address.uprn,
    )


async def award_pension(
    conn: asyncpg.Pool | asyncpg.Connection, nino: str, weekly_amount_pence: int, paid_until: date
) -> None:
    """A state pension in payment, paid up to and including ``paid_until``."""
    await conn.execute(
        "INSERT INTO agency.pension_award (nino, weekly_amount_pence, paid_until)"
        " VALUES ($1, $2, $3) ON CONFLICT (nino) DO NOTHING",
        normalise_nino(nino),
        weekly_amount_pence,
        paid_until,
    )


def driver_number_for(holder: models.Person) -> str:
    """A driver number in DVLA's shape (``schemas.identity_documents``), as a man's,
    ending in fixed characters."""
    born = holder.date_of_birth
    if born is None:
        raise ValueError("a driving licence holder's date of birth is needed for their driver number")
    initials = "".join(name[0] for name in holder.given_names.upper().split() if "A" <= name[0] <= "Z")
    return f"{surname_code(holder.family_name)}{birth_code(born)}{initials[:2].ljust(2, '9')}9AA"


async def issue_driving_licence(
    conn: asyncpg.Pool | asyncpg.Connection,
    holder: models.Person,
    address: models.Address,
    driver_number: str | None = None,
) -> str:
    """A valid licence for ``holder`` (whose date of birth DVLA always holds); returns
    its driver number."""
    number = driver_number or driver_number_for(holder)
    await conn.execute(
        "INSERT INTO agency.driving_licence (driver_number, given_names, family_name, date_of_birth,"
        "  address_lines, town, postcode, uprn)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (driver_number) DO NOTHING",
        number,
        holder.given_names,
        holder.family_name,
        holder.date_of_birth,
        address.lines,
        address.town,
        address.postcode,
        address.uprn,
    )
    return number


@dataclass(frozen=True)
class Resident:
    person: models.Person
    adult: bool = True
    elector: bool | None = None  # on the electoral register; by default, adults are

    @property
    def on_register(self) -> bool:
        return self.adult if self.elector is None else self.elector


async def register_household(
    db: asyncpg.Pool | asyncpg.Connection, agency: str, address: models.Address, residents: Sequence[Resident]
) -> int:
    """A council-tax household of ``agency`` (a council) at ``address`` with its
    residents and electors, and the single-person discount if exactly one adult
    lives there. Returns the household's id (the existing one, unchanged, when the
    council already holds a household at that address)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await register_household(conn, agency, address, residents)
    async with db.transaction():
        existing = await council.household_at(db, agency, address)
        if existing is not None:
            return existing
        household = await council.new_household(db, agency, address)
        for resident in residents:
            await council.add_resident(db, household, resident.person, resident.adult, None)
            if resident.on_register:
                await council.register_elector(db, household, resident.person, None)
        await council.recompute_discount(db, household)
        return household
