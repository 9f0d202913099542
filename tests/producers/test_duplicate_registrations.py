"""Duplicate registrations: a person is registered dead once, a child born once.

A second death for the same subject, or a second birth of the same child, is
refused with a 409 naming the first; idempotent repeats still get the first
reference; simultaneous duplicates record one; a voided registration stands in
no one's way; a supervisor may record one anyway, with a reason that is kept;
the registrars' form says the same. Against the real bus and database.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from operators.cli.run import _submit_demo
from operators.services import RunningBus
from producers.accounts import issue_token
from producers.duplicates import registration_claims
from producers.requests import BirthRegistration, DeathRegistration
from runtime.settings import Settings
from tests.producers.test_web_forms import (
    OFFICE,
    death_answers,
    records_by,
    send,
    serve_web,
    signed_in,
    to_check_page,
    web_settings,
)
from tests.support import death_registration, random_nino, today

pytestmark = pytest.mark.integration

ALREADY_REGISTERED = "urn:tuo:problem:already-registered"


def _client(bus: RunningBus, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}", timeout=20, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.fixture(scope="module")
async def supervisor(bus: RunningBus, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    """The intake API as a Leeds supervisor system."""
    token = await issue_token(pool, "leeds", "supervisor", f"duplicates supervisor {uuid.uuid4().hex[:6]}")
    async with _client(bus, token) as client:
        yield client


async def _written(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM intake_record"),
        await pool.fetchval("SELECT count(*) FROM outbox"),
        await pool.fetchval("SELECT count(*) FROM registration_claim"),
        await pool.fetchval("SELECT count(*) FROM duplicate_override"),
    )


def _letters() -> str:
    """A name no other test uses (names decide sameness where there is no NINO)."""
    return "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:8]).capitalize()


def _death_without_nino(family_name: str, **overrides: Any) -> dict[str, Any]:
    deceased = {"given_names": "Morgan Lee", "family_name": family_name, "date_of_birth": "1950-06-01"}
    return death_registration(deceased=deceased, **overrides)


def _parent(given: str, family: str, relationship: str) -> dict[str, str]:
    return {"given_names": given, "family_name": family, "relationship": relationship}


def _birth(child: str, family: str, parents: list[dict[str, str]], **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "informant": {"name": "Sam Sample", "relationship": "mother"},
        "channel": "desk",
        "child": {"given_names": child, "family_name": family, "date_of_birth": _born().isoformat()},
        "place_of_birth": "St James's University Hospital",
        "registration_district": "Leeds",
        "parents": parents,
        "home_address": {"lines": ["2 Sample Road"], "town": "Leeds", "postcode": "LS2 7AB"},
    }
    body.update(overrides)
    return body


def _born() -> date:
    return today() - timedelta(days=8)


def _assert_already_registered(response: httpx.Response, existing: str, what: str) -> None:
    assert response.status_code == 409, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == ALREADY_REGISTERED
    assert problem["title"] == f"This {what} is already registered"
    assert problem["existing_reference"] == existing
    assert problem["existing_office"] == "leeds"
    assert existing in problem["detail"] and "duplicate_override" in problem["detail"]


# --- What "the same" means (no database) ------------------------------------------------


def test_a_death_with_a_nino_claims_its_subject_and_one_without_claims_its_particulars() -> None:
    key = b"k" * 32
    with_nino = DeathRegistration.model_validate(death_registration())
    assert registration_claims(with_nino, "n-abc", key) == ["death:n-abc"]
    without = DeathRegistration.model_validate(_death_without_nino("Example"))
    spaced = DeathRegistration.model_validate(
        death_registration(
            deceased={
                "given_names": "morgan   LEE",
                "family_name": "  EXAMPLE",
                "date_of_birth": "1950-06-01",
            }
        )
    )
    (claim,) = registration_claims(without, "s-1", key)
    assert claim.startswith("death-unidentified:") and "Example" not in claim and "1950" not in claim
    assert registration_claims(spaced, "s-2", key) == [claim], "case and spacing do not make another person"
    later = DeathRegistration.model_validate(
        _death_without_nino("Example", date_of_death=(today() - timedelta(days=1)).isoformat())
    )
    assert registration_claims(later, "s-3", key) != [claim]
    assert registration_claims(without, "s-1", b"another key") != [claim], "keyed: not a plain hash"


def test_a_birth_claims_the_child_with_each_parent() -> None:
    key = b"k" * 32
    two = BirthRegistration.model_validate(
        _birth("Robin", "Sample", [_parent("Sam", "Sample", "mother"), _parent("Alex", "Sample", "father")])
    )
    one = BirthRegistration.model_validate(_birth("Robin", "Sample", [_parent("sam", "SAMPLE", "mother")]))
    twin = BirthRegistration.model_validate(_birth("Jesse", "Sample", [_parent("Sam", "Sample", "mother")]))
    assert len(registration_claims(two, "s-1", key)) == 2
    assert set(registration_claims(one, "s-2", key)) < set(registration_claims(two, "s-1", key))
    assert not set(registration_claims(twin, "s-3", key)) & set(registration_claims(two, "s-1", key))


# --- Refused over the API ------------------------------------------------------------------


async def test_a_second_death_for_the_same_nino_is_refused_with_409_naming_the_first(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    nino = random_nino()
    first = await intake.post(
        "/v1/death-registrations",
        json=death_registration(deceased={"given_names": "Pat", "family_name": "Twice", "nino": nino}),
    )
    assert first.status_code == 201, first.text
    before = await _written(pool)
    # Another informant, another office desk, the NINO written with spaces: the same person.
    again = death_registration(
        informant={"name": "Jo Twice", "relationship": "son"},
        deceased={
            "given_names": "Patricia",
            "family_name": "Twice",
            "nino": f"{nino[:2]} {nino[2:4]} {nino[4:]}",
        },
    )
    response = await intake.post("/v1/death-registrations", json=again, headers={"Idempotency-Key": "dup-1"})
    _assert_already_registered(response, first.json()["reference"], "death")
    assert await _written(pool) == before, "nothing is recorded"


async def test_a_death_without_a_nino_is_the_same_when_names_birth_death_and_postcode_match(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    family = _letters()
    first = await intake.post("/v1/death-registrations", json=_death_without_nino(family))
    assert first.status_code == 201, first.text
    subject = await pool.fetchval(
        "SELECT subject_id FROM intake_record WHERE reference = $1", first.json()["reference"]
    )
    assert subject.startswith("s-"), "without a NINO the subject id is random, so it cannot tell"
    same = _death_without_nino(family.upper(), place_of_death="St James's University Hospital")
    refused = await intake.post("/v1/death-registrations", json=same)
    _assert_already_registered(refused, first.json()["reference"], "death")
    elsewhere = _death_without_nino(
        family, last_address={"lines": ["9 Other Road"], "town": "York", "postcode": "YO1 7HH"}
    )
    assert (await intake.post("/v1/death-registrations", json=elsewhere)).status_code == 201, (
        "another last address: another person of the same name"
    )


async def test_a_second_birth_of_the_same_child_with_a_parent_in_common_is_refused(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    family = _letters()
    mother, father = _parent("Sam", family, "mother"), _parent("Alex", family, "father")
    first = await intake.post("/v1/birth-registrations", json=_birth("Robin", family, [mother, father]))
    assert first.status_code == 201, first.text
    before = await _written(pool)
    # Registered again by the mother alone, her name typed in capitals.
    again = _birth("Robin", family, [_parent("SAM", family.upper(), "mother")])
    _assert_already_registered(
        await intake.post("/v1/birth-registrations", json=again), first.json()["reference"], "birth"
    )
    assert await _written(pool) == before
    twin = await intake.post("/v1/birth-registrations", json=_birth("Jesse", family, [mother, father]))
    assert twin.status_code == 201, "a twin is another child"
    namesake = _birth("Robin", family, [_parent("Kim", family, "mother")])
    assert (await intake.post("/v1/birth-registrations", json=namesake)).status_code == 201, (
        "no parent in common: another family's child"
    )


async def test_an_idempotent_repeat_still_gets_the_first_reference_with_200(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = death_registration(deceased={"given_names": "Ida", "family_name": "Potent", "nino": random_nino()})
    key = f"dup-idem-{uuid.uuid4()}"
    first = await intake.post("/v1/death-registrations", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    other_key = await intake.post(
        "/v1/death-registrations", json=body, headers={"Idempotency-Key": f"dup-other-{uuid.uuid4()}"}
    )
    _assert_already_registered(other_key, first.json()["reference"], "death")
    before = await _written(pool)
    repeats = await asyncio.gather(
        *(
            intake.post("/v1/death-registrations", json=body, headers={"Idempotency-Key": key})
            for _ in range(3)
        )
    )
    assert [r.status_code for r in repeats] == [200, 200, 200]
    assert {r.json()["reference"] for r in repeats} == {first.json()["reference"]}
    assert await _written(pool) == before


async def test_simultaneous_duplicates_record_one_and_refuse_the_rest(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    nino = random_nino()
    bodies = [
        death_registration(
            informant={"name": f"Informant {i}", "relationship": "friend"},
            deceased={"given_names": "Con", "family_name": "Current", "nino": nino},
        )
        for i in range(8)
    ]
    responses = await asyncio.gather(*(intake.post("/v1/death-registrations", json=b) for b in bodies))
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in responses]
    for response in responses:
        if response is not created[0]:
            _assert_already_registered(response, created[0].json()["reference"], "death")
    stored = await pool.fetchval(
        "SELECT count(*) FROM intake_record WHERE subject_id ="
        " (SELECT subject_id FROM intake_record WHERE reference = $1)",
        created[0].json()["reference"],
    )
    assert stored == 1, "the same NINO, the same subject id: one registration stored"


async def test_a_voided_registration_does_not_block_a_new_one(
    intake: httpx.AsyncClient, supervisor: httpx.AsyncClient
) -> None:
    body = death_registration(deceased={"given_names": "Vo", "family_name": "Ided", "nino": random_nino()})
    first = (await intake.post("/v1/death-registrations", json=body)).json()["reference"]
    voided = await supervisor.post(f"/v1/events/{first}/void", json={"reason": "wrong person"})
    assert voided.status_code == 201, voided.text
    again = await intake.post("/v1/death-registrations", json=body)
    assert again.status_code == 201, again.text
    assert again.json()["reference"] != first
    _assert_already_registered(
        await intake.post("/v1/death-registrations", json=body), again.json()["reference"], "death"
    )


# --- A supervisor's override ----------------------------------------------------------------


async def test_a_supervisor_may_record_a_duplicate_with_a_reason_which_is_recorded(
    intake: httpx.AsyncClient, supervisor: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = death_registration(
        deceased={"given_names": "Over", "family_name": "Ridden", "nino": random_nino()}
    )
    first = (await intake.post("/v1/death-registrations", json=body)).json()["reference"]
    reason = "Coroner ordered a second registration after the inquest (case 2026/117)"
    started = datetime.now(UTC)
    overriding = {**body, "duplicate_override": {"existing_reference": first.lower(), "reason": reason}}
    key = f"dup-override-{uuid.uuid4()}"
    recorded = await supervisor.post(
        "/v1/death-registrations", json=overriding, headers={"Idempotency-Key": key}
    )
    assert recorded.status_code == 201, recorded.text
    reference = recorded.json()["reference"]
    row = await pool.fetchrow(
        "SELECT d.existing_reference, d.reason, d.overridden_by, d.overridden_at"
        "  FROM duplicate_override d JOIN intake_record i USING (event_id) WHERE i.reference = $1",
        reference,
    )
    assert row is not None
    assert row["existing_reference"] == first
    assert row["reason"] == reason
    assert row["overridden_by"].startswith("api:duplicates supervisor")
    assert started - timedelta(seconds=5) <= row["overridden_at"] <= datetime.now(UTC) + timedelta(seconds=5)
    shown = (await supervisor.get(f"/v1/events/{reference}")).json()["duplicate_override"]
    assert shown["existing_reference"] == first and shown["reason"] == reason
    assert (await intake.get(f"/v1/events/{first}")).json()["duplicate_override"] is None
    repeat = await supervisor.post(
        "/v1/death-registrations", json=overriding, headers={"Idempotency-Key": key}
    )
    assert (repeat.status_code, repeat.json()["reference"]) == (200, reference)
    # The override holds nothing: the next registration is still refused, naming the first.
    _assert_already_registered(await intake.post("/v1/death-registrations", json=body), first, "death")


async def test_a_registrar_may_not_override_and_nothing_is_written(
    intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = death_registration(
        deceased={"given_names": "Not", "family_name": "Allowed", "nino": random_nino()}
    )
    first = (await intake.post("/v1/death-registrations", json=body)).json()["reference"]
    before = await _written(pool)
    response = await intake.post(
        "/v1/death-registrations",
        json={**body, "duplicate_override": {"existing_reference": first, "reason": "the family asked"}},
    )
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "only a supervisor" in response.json()["detail"]
    assert await _written(pool) == before


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ({"existing_reference": "{first}"}, "duplicate_override.reason", "Field required"),
        (
            {"existing_reference": "{first}", "reason": ""},
            "duplicate_override.reason",
            "at least 3 characters",
        ),
        ({"existing_reference": "{first}", "reason": "    "}, "duplicate_override.reason", "at least 3"),
        ({"existing_reference": "{first}", "reason": "x" * 501}, "duplicate_override.reason", "at most 500"),
        ({"existing_reference": "{first}", "reason": "a\x1b[31mb"}, "duplicate_override.reason", "control"),
        ({"existing_reference": "{first}", "reason": 42}, "duplicate_override.reason", "valid string"),
        ({"reason": "the coroner asked"}, "duplicate_override.existing_reference", "Field required"),
        (
            {"existing_reference": "TUO-2026-' OR 1=1", "reason": "the coroner asked"},
            "duplicate_override.existing_reference",
            "like TUO-2026-ABCD-EFGH",
        ),
        (
            {"existing_reference": "{first}", "reason": "the coroner asked", "by": "someone else"},
            "duplicate_override.by",
            "Extra inputs are not permitted",
        ),
        ("yes please", "duplicate_override", "valid dictionary"),
        (
            {"existing_reference": "{unrelated}", "reason": "the coroner asked"},
            "duplicate_override.existing_reference",
            "is not a registration this one duplicates (it duplicates {first})",
        ),
    ],
    ids=[
        "missing-reason",
        "empty-reason",
        "blank-reason",
        "oversized-reason",
        "control-characters",
        "number-reason",
        "missing-reference",
        "malformed-reference",
        "unknown-field",
        "not-an-object",
        "another-registration",
    ],
)
async def test_a_bad_override_is_refused_naming_the_field_and_nothing_is_written(
    intake: httpx.AsyncClient,
    supervisor: httpx.AsyncClient,
    pool: asyncpg.Pool,
    override: Any,
    field: str,
    words: str,
) -> None:
    body = death_registration(
        deceased={"given_names": "Bad", "family_name": "Override", "nino": random_nino()}
    )
    first = (await intake.post("/v1/death-registrations", json=body)).json()["reference"]
    unrelated = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    if isinstance(override, dict):
        override = {
            k: v.format(first=first, unrelated=unrelated) if isinstance(v, str) and "{" in v else v
            for k, v in override.items()
        }
    before = await _written(pool)
    response = await supervisor.post("/v1/death-registrations", json={**body, "duplicate_override": override})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    errors = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert field in errors, errors
    assert words.format(first=first) in errors[field]
    assert await _written(pool) == before


async def test_an_override_with_nothing_to_override_is_refused(
    supervisor: httpx.AsyncClient, intake: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    unrelated = (await intake.post("/v1/death-registrations", json=death_registration())).json()["reference"]
    body = death_registration(deceased={"given_names": "New", "family_name": "Person", "nino": random_nino()})
    before = await _written(pool)
    response = await supervisor.post(
        "/v1/death-registrations",
        json={**body, "duplicate_override": {"existing_reference": unrelated, "reason": "just in case"}},
    )
    assert response.status_code == 422
    assert "duplicates no current registration" in response.json()["errors"][0]["message"]
    assert await _written(pool) == before


async def test_a_change_of_address_takes_no_override(supervisor: httpx.AsyncClient) -> None:
    move = {
        "informant": {"name": "Jo Citizen", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": "Jo", "family_name": "Citizen", "nino": random_nino()},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {"lines": ["4 New Street"], "town": "Leeds", "postcode": "LS3 3BB"},
        "effective_date": (today() - timedelta(days=1)).isoformat(),
        "duplicate_override": {"existing_reference": "TUO-2026-ABCD-EFGH", "reason": "moving twice"},
    }
    response = await supervisor.post("/v1/address-changes", json=move)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "duplicate_override", "message": "Extra inputs are not permitted"}
    ]
    moved = await supervisor.post(
        "/v1/address-changes", json={k: v for k, v in move.items() if k != "duplicate_override"}
    )
    again = await supervisor.post(
        "/v1/address-changes", json={k: v for k, v in move.items() if k != "duplicate_override"}
    )
    assert (moved.status_code, again.status_code) == (201, 201), "people may move more than once"


# --- The registrars' form ------------------------------------------------------------------


@pytest.fixture(scope="module")
async def forms(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    async with serve_web(web_settings(services), pool) as base_url:
        yield base_url


@pytest.fixture
async def browser(forms: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=forms, timeout=20, follow_redirects=False) as client:
        yield client


async def test_the_form_shows_a_duplicate_death_with_its_reference_and_a_registrar_cannot_override(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    answers = death_answers()
    username = await signed_in(browser, pool)
    first = await send(browser, await to_check_page(browser, answers))
    first_reference = first.headers["location"].removeprefix("/registrations/")
    check = await to_check_page(browser, {**answers, "informant.name": "Sam Example"})
    again = await send(browser, check)
    assert again.status_code == 409
    page = again.text
    assert "<title>Error: Check your answers" in page
    summary = page[page.index("govuk-error-summary") : page.index("</ul>", page.index("govuk-error-summary"))]
    assert f"This death is already registered, reference number {first_reference}" in summary
    assert "Ask a supervisor" in summary
    assert 'href="#already-registered"' in summary and 'id="already-registered"' in page
    assert "Accept and send" not in page and "override_reason" not in page, "no way round it for a registrar"
    assert await records_by(pool, username) == 1
    # Posting the supervisor's form by hand does not get round it either.
    forced = await send(browser, check, existing_reference=first_reference, override_reason="family asked")
    assert forced.status_code == 403
    assert "Only a supervisor" in forced.text
    assert await records_by(pool, username) == 1


async def test_a_supervisor_records_a_duplicate_death_on_the_form_with_a_reason(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    answers = death_answers()
    await signed_in(browser, pool)
    first_reference = (await send(browser, await to_check_page(browser, answers))).headers["location"]
    first_reference = first_reference.removeprefix("/registrations/")
    username = await signed_in(browser, pool, role="supervisor")
    refused = await send(browser, await to_check_page(browser, answers))
    assert refused.status_code == 409
    assert f"reference number {first_reference}" in refused.text
    assert 'href="#override-reason"' in refused.text and 'id="override-reason"' in refused.text
    for reason, message in [
        ("", "Enter the reason for recording it again"),
        ("x" * 501, "The reason must be 500 characters or fewer"),
    ]:
        bad = await send(
            browser,
            refused,
            existing_reference=first_reference,
            existing_office=OFFICE,
            override_reason=reason,
        )
        assert bad.status_code == 422
        assert bad.text.count(message) == 2, "in the summary and beside the field"
        assert f"reference number {first_reference}" in bad.text
        assert await records_by(pool, username) == 0
    reason = "Coroner ordered a second\r\nregistration"
    recorded = await send(
        browser, refused, existing_reference=first_reference, existing_office=OFFICE, override_reason=reason
    )
    assert recorded.status_code == 303, recorded.text
    reference = recorded.headers["location"].removeprefix("/registrations/")
    row = await pool.fetchrow(
        "SELECT d.existing_reference, d.reason, d.overridden_by"
        "  FROM duplicate_override d JOIN intake_record i USING (event_id) WHERE i.reference = $1",
        reference,
    )
    assert dict(row) == {
        "existing_reference": first_reference,
        "reason": "Coroner ordered a second registration",
        "overridden_by": f"registrar:{username}",
    }


# --- The demo, run again on the data it kept ------------------------------------------------


async def test_the_demo_run_again_shows_its_death_and_birth_as_already_registered(
    bus: RunningBus, pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    token = await issue_token(pool, "leeds", "registrar", f"demo again {uuid.uuid4().hex[:6]}")
    base = f"http://127.0.0.1:{bus.http_port}"
    await _submit_demo(base, token, wait_seconds=5)
    first = capsys.readouterr().out
    await _submit_demo(base, token, wait_seconds=5)  # before this change: DemoRefused (409)
    second = capsys.readouterr().out
    # Each run names its three references first (and then again beside each status table).
    references = list(dict.fromkeys(re.findall(r"TUO-[0-9]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", first)))
    again = list(dict.fromkeys(re.findall(r"TUO-[0-9]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", second)))
    assert len(references) == len(again) == 3
    assert again[:2] == references[:2], "the death and the birth already registered are shown"
    assert again[2] != references[2], "a second change of address is another event"


async def test_an_override_on_the_form_after_the_first_was_voided_says_what_changed(
    browser: httpx.AsyncClient, bus: RunningBus, pool: asyncpg.Pool
) -> None:
    answers = death_answers()
    await signed_in(browser, pool)
    first = (await send(browser, await to_check_page(browser, answers))).headers["location"]
    first = first.removeprefix("/registrations/")
    username = await signed_in(browser, pool, role="supervisor")
    refused = await send(browser, await to_check_page(browser, answers))
    assert refused.status_code == 409
    token = await issue_token(pool, OFFICE, "supervisor", f"web void {uuid.uuid4().hex[:6]}")
    async with _client(bus, token) as api:
        voided = await api.post(f"/v1/events/{first}/void", json={"reason": "wrong person"})
    assert voided.status_code == 201, voided.text
    late = await send(
        browser, refused, existing_reference=first, existing_office=OFFICE, override_reason="coroner asked"
    )
    assert late.status_code == 422
    assert "The registration to record over has changed" in late.text
    assert 'href="#send"' in late.text and "Accept and send" in late.text, "it may now simply be sent"
    assert await records_by(pool, username) == 0
