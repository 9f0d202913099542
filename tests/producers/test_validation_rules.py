"""Every validation rule of the contract, tried over HTTP with a violating event:
the error names the field and says what is wrong, and nothing is stored."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import death_registration, today

pytestmark = pytest.mark.integration

# Two days ahead: still in the future if the run crosses midnight after collecting the cases.
FUTURE = (today() + timedelta(days=2)).isoformat()
ADDRESS = {"lines": ["2 Sample Road"], "town": "Leeds", "postcode": "LS2 7AB"}


def birth(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "informant": {"name": "Sam Sample", "relationship": "mother"},
        "channel": "desk",
        "child": {
            "given_names": "Robin",
            "family_name": "Sample",
            "date_of_birth": (today() - timedelta(days=9)).isoformat(),
        },
        "place_of_birth": "St James's University Hospital",
        "registration_district": "Leeds",
        "parents": [
            {
                "given_names": "Sam",
                "family_name": "Sample",
                "relationship": "mother",
                "date_of_birth": "1990-05-01",
            }
        ],
        "home_address": ADDRESS,
    }
    body.update(overrides)
    return body


def move(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "informant": {"name": "Jo Citizen", "relationship": "self"},
        "channel": "online",
        "person": {"given_names": "Jo", "family_name": "Citizen", "nino": "CE654321A"},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": ADDRESS,
        "effective_date": (today() - timedelta(days=1)).isoformat(),
    }
    body.update(overrides)
    return body


def person(**changes: Any) -> dict[str, Any]:
    return {"given_names": "Chris", "family_name": "Example", "relationship": "wife", **changes}


RULES: list[tuple[str, str, dict[str, Any], str, str]] = [
    # (rule, endpoint, body, field named, words in the message)
    (
        "NINO format",
        "death-registrations",
        death_registration(deceased={"given_names": "A", "family_name": "B", "nino": "QQ123456Z"}),
        "deceased.nino",
        "National Insurance number",
    ),
    (
        "NINO of a related person",
        "death-registrations",
        death_registration(surviving_partner=person(nino="12 34 56")),
        "surviving_partner.nino",
        "National Insurance number",
    ),
    (
        "postcode format",
        "address-changes",
        move(new_address={**ADDRESS, "postcode": "LS1 1CC"}),
        "new_address.postcode",
        "UK postcode",
    ),
    (
        "postcode of a related person's address",
        "death-registrations",
        death_registration(
            executor=person(relationship="solicitor", address={**ADDRESS, "postcode": "12345"})
        ),
        "executor.address.postcode",
        "UK postcode",
    ),
    (
        "UPRN digits",
        "address-changes",
        move(old_address={**ADDRESS, "uprn": "12-34"}),
        "old_address.uprn",
        "UPRN",
    ),
    (
        "UPRN length",
        "death-registrations",
        death_registration(last_address={**ADDRESS, "uprn": "1234567890123"}),
        "last_address.uprn",
        "1 to 12 digits",
    ),
    (
        "date of death not in the future",
        "death-registrations",
        death_registration(date_of_death=FUTURE),
        "date_of_death",
        "future",
    ),
    (
        "date of birth not in the future",
        "death-registrations",
        death_registration(deceased={"given_names": "A", "family_name": "B", "date_of_birth": FUTURE}),
        "deceased.date_of_birth",
        "future",
    ),
    (
        "death not before birth",
        "death-registrations",
        death_registration(date_of_death="1941-03-01"),
        "date_of_death",
        "before the deceased's date of birth",
    ),
    (
        "child's birth date required",
        "birth-registrations",
        birth(child={"given_names": "Robin", "family_name": "Sample"}),
        "child",
        "date_of_birth is required",
    ),
    (
        "child not born in the future",
        "birth-registrations",
        birth(child={"given_names": "Robin", "family_name": "Sample", "date_of_birth": FUTURE}),
        "child.date_of_birth",
        "future",
    ),
    (
        "parents born before the child",
        "birth-registrations",
        birth(
            parents=[person(relationship="mother", date_of_birth=(today() - timedelta(days=1)).isoformat())]
        ),
        "parents",
        "before the child's",
    ),
    ("at least one parent", "birth-registrations", birth(parents=[]), "parents", "at least 1"),
    (
        "registration district required",
        "birth-registrations",
        {k: v for k, v in birth().items() if k != "registration_district"},
        "registration_district",
        "required",
    ),
    (
        "effective date not in the future",
        "address-changes",
        move(effective_date=FUTURE),
        "effective_date",
        "future",
    ),
    (
        "a move changes the address",
        "address-changes",
        move(new_address={"lines": ["3 Old Lane"], "town": "York", "postcode": "yo17hh"}),
        "new_address",
        "same as old_address",
    ),
    (
        "who moves: their NINO",
        "address-changes",
        move(moving_with=[person(nino="not-a-nino")]),
        "moving_with.0.nino",
        "National Insurance number",
    ),
    (
        "no control characters",
        "address-changes",
        move(person={"given_names": "Jo\u0007", "family_name": "Citizen"}),
        "person.given_names",
        "control characters",
    ),
    ("capture channel", "birth-registrations", birth(channel="fax"), "channel", "'desk'"),
    (
        "agency code shape",
        "death-registrations",
        death_registration(consents=[{"agency": "DVLA; DROP TABLE", "choice": "given"}]),
        "consents.0.agency",
        "agency code",
    ),
]


async def _stored(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT (SELECT count(*) FROM intake_record) + (SELECT count(*) FROM outbox)"
    )
    return count


@pytest.mark.parametrize(("rule", "endpoint", "body", "field", "words"), RULES, ids=[r[0] for r in RULES])
async def test_rule_violation_names_the_field_and_stores_nothing(
    intake: httpx.AsyncClient,
    pool: asyncpg.Pool,
    rule: str,
    endpoint: str,
    body: dict[str, Any],
    field: str,
    words: str,
) -> None:
    before = await _stored(pool)
    response = await intake.post(f"/v1/{endpoint}", json=body)
    assert response.status_code == 422, f"{rule}: {response.text}"
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert field in errors, f"{rule}: expected {field}, got {errors}"
    assert words in errors[field], f"{rule}: {errors[field]!r}"
    assert await _stored(pool) == before


@pytest.mark.parametrize(
    ("endpoint", "body"), [("birth-registrations", birth()), ("address-changes", move())]
)
async def test_valid_births_and_moves_are_accepted(
    intake: httpx.AsyncClient, endpoint: str, body: dict[str, Any]
) -> None:
    response = await intake.post(f"/v1/{endpoint}", json=body)
    assert response.status_code == 201, response.text
