"""Demo data for the local stack: registration offices, a registrar who can sign
in to the forms, and one of each life event as a registrar would submit them
over the intake API. The people are fictional."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from consumers.agencies import records
from producers.accounts import add_registrar, ensure_office
from producers.requests import AddressChange, DeathRegistration
from router.interest import change_interest, subject_ids
from runtime.sealing import PayloadSealer

DEMO_OFFICES = {
    "leeds": "Leeds Register Office",
    "bradford": "Bradford Register Office",
    "online": "Tell Us Once online service",
}
DEMO_REGISTRAR = "demo.registrar"
DEMO_WEEKLY_PENSION_PENCE = 23025  # the full new State Pension, 2025/26
CREDENTIALS_FILE = "demo-credentials.txt"


@dataclass(frozen=True)
class DemoSignIn:
    username: str
    password: str
    credentials_file: Path


async def seed_offices(pool: asyncpg.Pool, sealer: PayloadSealer) -> None:
    for code, name in DEMO_OFFICES.items():
        await ensure_office(pool, code, name, sealer)


async def seed_demo_registrar(pool: asyncpg.Pool, state_dir: Path) -> DemoSignIn:
    """A registrar at the Leeds office with a random password, kept (0600) in the
    state directory so every demo run can show it."""
    # The blocking file calls below touch one small local file, once, before the bus starts.
    path = state_dir / CREDENTIALS_FILE
    exists = await pool.fetchval("SELECT 1 FROM registrar WHERE username = $1", DEMO_REGISTRAR)
    if exists and path.exists():
        username, password = path.read_text().splitlines()[:2]
        return DemoSignIn(username, password, path)
    password = secrets.token_urlsafe(12)
    if exists:
        await pool.execute("DELETE FROM registrar WHERE username = $1", DEMO_REGISTRAR)
    await add_registrar(pool, DEMO_REGISTRAR, "Demo Registrar", "leeds", "supervisor", password)
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    path.touch(mode=0o600)
    path.write_text(f"{DEMO_REGISTRAR}\n{password}\n")
    return DemoSignIn(DEMO_REGISTRAR, password, path)


def demo_submissions(today: date) -> list[tuple[str, dict[str, Any]]]:
    informant = {"name": "Alex Example", "relationship": "son"}
    address = {"lines": ["1 Example Street"], "town": "Leeds", "postcode": "LS1 1AA", "uprn": "72000001"}
    return [
        (
            "/v1/death-registrations",
            {
                "informant": informant,
                "channel": "desk",
                "deceased": {
                    "given_names": "Pat",
                    "family_name": "Example",
                    "date_of_birth": "1941-03-02",
                    "nino": "AB123456C",
                },
                "date_of_death": (today - timedelta(days=3)).isoformat(),
                "place_of_death": "Leeds General Infirmary",
                "last_address": address,
                "surviving_partner": {
                    "given_names": "Chris",
                    "family_name": "Example",
                    "relationship": "wife",
                    "nino": "CE112233D",
                },
                "executor": {"given_names": "Alex", "family_name": "Example", "relationship": "son"},
                "consents": [{"agency": "dvla", "choice": "given"}, {"agency": "hmpo", "choice": "refused"}],
            },
        ),
        (
            "/v1/birth-registrations",
            {
                "informant": {"name": "Sam Sample", "relationship": "mother"},
                "channel": "desk",
                "child": {
                    "given_names": "Robin",
                    "family_name": "Sample",
                    "date_of_birth": (today - timedelta(days=10)).isoformat(),
                },
                "place_of_birth": "St James's Hospital, Leeds",
                "registration_district": "Leeds",
                "parents": [{"given_names": "Sam", "family_name": "Sample", "relationship": "mother"}],
                "home_address": {"lines": ["2 Sample Road"], "town": "Leeds", "postcode": "LS2 7AB"},
            },
        ),
        (
            "/v1/address-changes",
            {
                "informant": {"name": "Jo Citizen", "relationship": "self"},
                "channel": "online",
                "person": {
                    "given_names": "Jo",
                    "family_name": "Citizen",
                    "date_of_birth": "1985-07-14",  # DVLA finds a licence by name and date of birth
                    "nino": "CE654321A",
                },
                "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
                "new_address": {"lines": ["4 New Street"], "town": "Leeds", "postcode": "LS3 1AB"},
                "effective_date": (today - timedelta(days=1)).isoformat(),
                "consents": [
                    {"agency": "dvla", "choice": "given"},
                    {"agency": "council-leeds", "choice": "given"},
                ],
            },
        ),
    ]


async def seed_agency_records(pool: asyncpg.Pool, today: date) -> None:
    """The reference agencies' records of the people in ``demo_submissions(today)``,
    so that every agency entitled to the demo's death and move applies them: the
    deceased's tax record, pension (paid up to today, so the death leaves an
    overpayment), driving licence and Leeds household (shared with the surviving
    partner, who is then entitled to the single-person discount); the mover's tax
    record and driving licence (Leeds makes a household for them when they arrive).
    Records already there are left as they are."""
    submitted = {path: body for path, body in demo_submissions(today)}
    death = DeathRegistration.model_validate(submitted["/v1/death-registrations"])
    move = AddressChange.model_validate(submitted["/v1/address-changes"])
    deceased, home = death.deceased.contract(), death.last_address.contract()
    mover = move.person.contract()
    residents = [records.Resident(deceased)]
    if death.surviving_partner is not None:
        residents.append(records.Resident(death.surviving_partner.contract().person))
    async with pool.acquire() as conn, conn.transaction():
        if death.deceased.nino is not None:
            await records.open_tax_record(conn, death.deceased.nino, deceased, home)
            await records.award_pension(conn, death.deceased.nino, DEMO_WEEKLY_PENSION_PENCE, today)
        await records.issue_driving_licence(conn, deceased, home)
        await records.register_household(conn, "council-leeds", home, residents)
        if move.person.nino is not None:
            await records.open_tax_record(conn, move.person.nino, mover, move.old_address.contract())
        await records.issue_driving_licence(conn, mover, move.old_address.contract())


async def register_demo_interest(pool: asyncpg.Pool, pseudonym_key: bytes, today: date) -> None:
    """DWP's registration of the people it pays a pension to (router.interest): the demo's
    deceased, whose award ``seed_agency_records`` makes. DWP hears of a move only of the
    people it registered, so the demo's move (of someone DWP pays nothing) is withheld from
    it as not of interest. Registering again changes nothing."""
    submitted = {path: body for path, body in demo_submissions(today)}
    death = DeathRegistration.model_validate(submitted["/v1/death-registrations"])
    if death.deceased.nino is not None:
        register = subject_ids([death.deceased.nino], pseudonym_key)
        await change_interest(pool, "dwp", register=register, withdraw=[], by="demo")
