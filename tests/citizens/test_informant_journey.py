"""The informant's journey at /tell-us-once over real HTTP, against the real PostgreSQL
and the running bus: registrations are recorded through intake's API (as a register
office's system would) and routed by the bus; the informant comes in with the
reference and the date of birth, in a browser of their own (an httpx cookie jar)."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from citizens.informants import ANSWER_NO_SOONER_SECONDS, MAX_WRONG_ANSWERS, install_informant_journey
from operators.replay import REPLAY_ID_HEADER
from producers.accept import Intake
from producers.accounts import issue_token
from router.consent_receipts import ConsentReceiptIssuer, consent_signer_within
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import decode
from tests.citizen_browser import Stack, browser, serve_citizens
from tests.support import death_registration, eventually, header, read_topic, tuo_cli

pytestmark = pytest.mark.integration

BORN = {"born-day": "2", "born-month": "3", "born-year": "1941"}  # death_registration()'s deceased
WRONG_BORN = {"born-day": "3", "born-month": "3", "born-year": "1941"}


def install_with_intake(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
    """The journey as ``operators.web`` composes it: requests recorded by intake."""
    recorder = Intake(
        settings, pool, receipts=ConsentReceiptIssuer(settings), consent_signer=consent_signer_within
    )
    install_informant_journey(app, settings, pool, recorder.request_services)


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool, install_with_intake) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


async def registered(intake: httpx.AsyncClient) -> str:
    answer = await intake.post("/v1/death-registrations", json=death_registration())
    assert answer.status_code == 201, answer.text
    reference: str = answer.json()["reference"]
    return reference


async def enter(
    client: httpx.AsyncClient, stack: Stack, reference: str, born: dict[str, str]
) -> httpx.Response:
    return await client.post(
        f"{stack.base_url}/tell-us-once/reference", data={"reference": reference, **born}
    )


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def error_links(page: str) -> dict[str, str]:
    """The error summary's messages, by the field each links to."""
    summary = page.split('class="govuk-error-summary"', 1)[1].split("</ul>", 1)[0]
    return {
        href: html.unescape(text).strip()
        for href, text in re.findall(r'<a href="#([\w-]+)">\s*([^<]+?)\s*</a>', summary)
    }


async def wrong_answers(pool: asyncpg.Pool, reference: str) -> int | None:
    failures: int | None = await pool.fetchval(
        "SELECT failures FROM informant_reference_lock WHERE reference = $1", reference
    )
    return failures


async def test_the_reference_and_date_of_birth_open_the_registration_and_show_who_was_told(
    stack: Stack, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with browser() as client:
        start = await client.get(f"{stack.base_url}/tell-us-once")
        assert start.status_code == 200 and "Start now" in start.text
        assert 'href="/tell-us-once/reference"' in start.text

        # Typed as people type it: lower case, with spaces.
        typed = reference.lower().replace("-", " - ")
        opened = await enter(client, stack, typed, BORN)
        assert opened.status_code == 303, text_of(opened.text)
        assert opened.headers["location"] == "/tell-us-once/registration"

        async def told() -> str | None:
            page = await client.get(f"{stack.base_url}/tell-us-once/registration")
            assert page.status_code == 200, page.text
            words = text_of(page.text)
            return words if words.count("They were told.") >= 2 else None

        page = await eventually(told, timeout=30, what="the statutory agencies told, on the informant's page")
    assert f"Reference {reference}" in page
    assert "The death you registered" in page
    for statutory in ("HM Revenue and Customs", "Department for Work and Pensions"):
        assert re.search(rf"{re.escape(statutory)} They were told\.", page), statutory
    # The desk consents (DVLA given, the Passport Office refused) are the informant's choices so far.
    # The desk's choices (DVLA given, the Passport Office refused) decided who was told of the death.
    assert re.search(r"Driver and Vehicle Licensing Agency They were told\.", page)
    assert not re.search(r"HM Passport Office They were told\.", page)
    # Who can be asked now, and what each would be told, from its subscription.
    choices = page.split("Who can be told if you agree", 1)[1]
    hmpo = choices.split("HM Passport Office", 1)[1]
    assert hmpo.startswith(
        " Not asked yet. They would be told: date of death, name and date of birth;"
        " and from you, the passport number."
    ), hmpo[:200]
    dvla = choices.split("Driver and Vehicle Licensing Agency", 1)[1]
    assert dvla.startswith(
        " Not asked yet. They would be told: address, date of death, name and date of birth;"
        " and from you, the driving licence number."
    ), dvla[:200]
    # Nothing about the person beyond the kind of registration: no name, no date of birth.
    assert "Example" not in page and "1941" not in page


async def test_a_reference_from_another_office_opens_the_journey(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    token = await issue_token(pool, "bradford", "registrar", "informant journey test")
    async with httpx.AsyncClient(
        base_url=str(intake.base_url), headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as bradford:
        reference = await registered(bradford)
    office = await pool.fetchval(
        "SELECT registration_office FROM intake_record WHERE reference = $1", reference
    )
    assert office == "bradford"
    async with browser() as client:
        assert (await enter(client, stack, reference, BORN)).status_code == 303


async def test_five_wrong_dates_of_birth_lock_the_reference_until_the_office_unlocks_it(
    stack: Stack, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with browser() as client:
        for n in range(1, MAX_WRONG_ANSWERS):
            wrong = await enter(client, stack, reference, WRONG_BORN)
            assert wrong.status_code == 400
            assert error_links(wrong.text) == {
                "reference": "The reference or the date of birth is not right:"
                " check both against the registrar's letter"
            }
            assert await wrong_answers(pool, reference) == n
        locked = await enter(client, stack, reference, WRONG_BORN)
        assert locked.status_code == 403 and "This reference is locked" in locked.text
        # Now even the right date of birth is refused, and no session is started.
        still = await enter(client, stack, reference, BORN)
        assert still.status_code == 403 and "This reference is locked" in still.text
        assert "tuo-informant" not in still.headers.get("set-cookie", "")
        assert await wrong_answers(pool, reference) == MAX_WRONG_ANSWERS

        # The register office, having checked who is asking, unlocks it (typed as read out).
        unlock = ("informants", "unlock", reference.lower(), "--by", "Leeds office")
        code, output = await asyncio.to_thread(tuo_cli, services, *unlock)
        assert code == 0 and f"{reference} can be used again" in output, output
        code, output = await asyncio.to_thread(tuo_cli, services, *unlock)
        assert code == 1 and "is not locked" in output, output
        assert (await enter(client, stack, reference, BORN)).status_code == 303
        assert await wrong_answers(pool, reference) is None


async def test_an_unknown_reference_gets_the_same_answer_as_a_wrong_date_of_birth(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    unknown = f"TUO-2026-{uuid.uuid4().hex[:4].upper()}-{uuid.uuid4().hex[:4].upper()}"
    async with browser() as client:
        wrong_birth = await enter(client, stack, reference, WRONG_BORN)
        wrong_reference = await enter(client, stack, unknown, BORN)
    assert wrong_birth.status_code == wrong_reference.status_code == 400
    # Nor does the time taken tell them apart: neither comes back before the common floor
    # (without it, an unknown reference was answered in about 0.09 s here).
    for answer in (wrong_birth, wrong_reference):
        assert answer.elapsed.total_seconds() >= ANSWER_NO_SOONER_SECONDS, answer.elapsed
    assert error_links(wrong_birth.text) == error_links(wrong_reference.text)
    assert (
        await pool.fetchval("SELECT count(*) FROM informant_reference_lock WHERE reference = $1", unknown)
        == 0
    )


async def test_an_expired_reference_is_refused_with_a_page_that_says_what_to_do(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    await pool.execute(
        "UPDATE intake_record SET recorded_at = now() - interval '29 days' WHERE reference = $1", reference
    )
    async with browser() as client:
        expired = await enter(client, stack, reference, BORN)
        assert expired.status_code == 410
        words = text_of(expired.text)
        assert "This reference has expired" in words and "28 days after the registration" in words
        assert "tuo-informant" not in expired.headers.get("set-cookie", "")
        # A wrong date of birth is still only "not right": expiry is told only to who knows it.
        assert (await enter(client, stack, reference, WRONG_BORN)).status_code == 400


async def test_malformed_missing_and_oversized_answers_get_linked_field_errors_and_change_nothing(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    cases: list[tuple[dict[str, str], dict[str, str]]] = [
        (
            {},
            {"reference": "Enter the reference from the registrar", "born-day": "Enter their date of birth"},
        ),
        (
            {"reference": reference, "born-day": "2", "born-year": "1941"},
            {"born-month": "Date of birth must include a month"},
        ),
        (
            {"reference": reference, "born-day": "31", "born-month": "2", "born-year": "1941"},
            {"born-day": "Date of birth must be a real date, like 27 3 1950"},
        ),
        (
            {"reference": reference, "born-day": "1", "born-month": "1", "born-year": "2999"},
            {"born-day": "Date of birth must be in the past"},
        ),
        (
            {"reference": "x" * 100_000, **BORN},
            {"reference": "Enter the reference as it is on the registrar's letter, like TUO-2026-ABCD-1234"},
        ),
        (
            {"reference": "TUO'; DROP TABLE intake_record; --", **BORN},
            {"reference": "Enter the reference as it is on the registrar's letter, like TUO-2026-ABCD-1234"},
        ),
        (
            {"reference": reference, "born-day": "<script>", "born-month": "3", "born-year": "1941"},
            {"born-day": "Date of birth must be a real date, like 27 3 1950"},
        ),
    ]
    async with browser() as client:
        for form, expected in cases:
            answer = await client.post(f"{stack.base_url}/tell-us-once/reference", data=form)
            assert answer.status_code == 400, form
            assert error_links(answer.text) == expected, form
            assert "<script>" not in answer.text, "what was typed is shown back escaped"
            assert len(answer.text) < 40_000, "what was typed is never shown back whole"
            for field in expected:  # each message is also beside its field
                assert (
                    f'id="{field}-error"' in answer.text or f'id="{field.split("-")[0]}-error"' in answer.text
                )
    assert await wrong_answers(pool, reference) is None, "a form that could not be read is not a wrong answer"


async def test_the_journey_has_its_own_session_which_signs_out_only_with_its_csrf_token(
    stack: Stack, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with browser() as stranger:
        nowhere = await stranger.get(f"{stack.base_url}/tell-us-once/registration")
        assert nowhere.status_code == 303 and nowhere.headers["location"] == "/tell-us-once/reference"
        stranger.cookies.set("tuo-session", "a-citizens-or-registrars-token")
        assert (await stranger.get(f"{stack.base_url}/tell-us-once/registration")).status_code == 303
    async with browser() as client:
        assert (await enter(client, stack, reference, BORN)).status_code == 303
        token = client.cookies.get("tuo-informant")
        assert token
        # The informant's session opens nothing of a citizen's.
        assert (await client.get(f"{stack.base_url}/citizen/me")).status_code in (303, 401)
        page = await client.get(f"{stack.base_url}/tell-us-once/registration")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf
        refused = await client.post(f"{stack.base_url}/tell-us-once/sign-out", data={"csrf_token": "guess"})
        assert refused.status_code == 403
        assert (await client.get(f"{stack.base_url}/tell-us-once/registration")).status_code == 200
        out = await client.post(f"{stack.base_url}/tell-us-once/sign-out", data={"csrf_token": csrf.group(1)})
        assert out.status_code == 200 and "You have signed out" in out.text
    async with browser() as replaying:
        replaying.cookies.set("tuo-informant", token)
        gone = await replaying.get(f"{stack.base_url}/tell-us-once/registration")
        assert gone.status_code == 303, "a signed-out session's token opens nothing"


async def test_after_a_correction_the_corrected_date_of_birth_opens_the_registration(
    stack: Stack, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    corrected = await intake.post(
        f"/v1/events/{reference}/corrections",
        json={"changes": [{"field": "deceased.date_of_birth", "value": "1941-03-12"}], "reason": "misread"},
    )
    assert corrected.status_code == 201, corrected.text
    async with browser() as client:
        assert (await enter(client, stack, reference, BORN)).status_code == 400, "the date as first recorded"
        new_born = {**BORN, "born-day": "12"}
        assert (await enter(client, stack, reference, new_born)).status_code == 303
        # The correction's own reference is not a registration: it opens nothing.
        assert (await enter(client, stack, corrected.json()["reference"], new_born)).status_code == 400


# Choosing more organisations to tell.

LICENCE = "EXAMP403021PJ9AB"  # death_registration()'s Pat Example, born 2 March 1941
PASSPORT = "123456789"
NOT_A_PASSPORT = "Enter the passport number as it is on the passport: 9 numbers, like 123456789"


async def opened(client: httpx.AsyncClient, stack: Stack, intake: httpx.AsyncClient) -> tuple[str, str]:
    """A new death's reference, opened in ``client``; and the services form's CSRF token."""
    reference = await registered(intake)
    assert (await enter(client, stack, reference, BORN)).status_code == 303
    form = await client.get(f"{stack.base_url}/tell-us-once/services")
    assert form.status_code == 200, form.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token
    return reference, token.group(1)


async def test_the_informant_asks_the_passport_office_which_alone_is_sent_the_passport_number(
    stack: Stack, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    async with browser() as client:
        reference, csrf = await opened(client, stack, intake)
        answers = {
            "csrf_token": csrf,
            "agencies": "hmpo",
            "passport_number": " 1234 56789 ",
            "permission": "yes",
        }
        check = await client.post(f"{stack.base_url}/tell-us-once/services", data=answers)
        assert check.status_code == 200, text_of(check.text)
        words = text_of(check.text)
        assert "Check your answers" in words and "Passport number: 123456789" in words
        assert "Driver and Vehicle Licensing Agency" not in words
        sent = await client.post(f"{stack.base_url}/tell-us-once/services/confirm", data=answers)
        assert sent.status_code == 200, text_of(sent.text)
        request_reference = re.search(
            r"TUO-\d{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", text_of(sent.text).split("reference", 1)[1]
        )
        assert request_reference and request_reference.group(0) != reference
        # The same answers sent again (a double click) are the same request.
        again = await client.post(f"{stack.base_url}/tell-us-once/services/confirm", data=answers)
        assert request_reference.group(0) in again.text

        request = await pool.fetchrow(
            "SELECT event_id, event_type, registration_office, follows_event_id IS NOT NULL AS follows"
            " FROM intake_record WHERE reference = $1",
            request_reference.group(0),
        )
        assert dict(request) | {"event_id": None} == {
            "event_id": None,
            "event_type": "ServicesRequested",
            "registration_office": "online",
            "follows": True,
        }
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM intake_record WHERE event_type = 'ServicesRequested'"
                " AND follows_event_id = (SELECT event_id FROM intake_record WHERE reference = $1)",
                reference,
            )
            == 1
        )
        # The choice is the informant's consent, with a consent receipt, online.
        consent = await pool.fetch(
            "SELECT r.agency, r.event_type, r.choice, r.recorded_by FROM consent_record r"
            " JOIN consent_receipt c ON c.consent_record_id = r.id WHERE c.event_id = $1",
            request["event_id"],
        )
        assert [dict(c) for c in consent] == [
            {
                "agency": "hmpo",
                "event_type": "ServicesRequested",
                "choice": "given",
                "recorded_by": "informant",
            }
        ]

        # The Passport Office is sent the person, the death and the passport number; nothing else.
        topics = Topics(services.topic_prefix)

        async def copy_for(agency: str) -> dict[str, Any] | None:
            for record in await read_topic(services, topics.agency(agency)):
                if header(record, "ce_id") == str(request["event_id"]):
                    return decode(record.value or b"")[1]
            return None

        async def hmpo_copy() -> dict[str, Any] | None:
            return await copy_for("hmpo")

        sent_to_hmpo = await eventually(
            hmpo_copy, timeout=60, what="the request on the Passport Office's topic"
        )
        assert sent_to_hmpo["passport_number"] == PASSPORT
        assert sent_to_hmpo["person"]["family_name"] == "Example"
        assert sent_to_hmpo["driving_licence_number"] is None and sent_to_hmpo["address"] is None
        assert sent_to_hmpo["envelope"]["channel"] == "ONLINE"
        assert sent_to_hmpo["envelope"]["informant"]["name"] is None
        # DVLA did not agree to this request: it is not sent it.
        decisions = await eventually(
            lambda: _decisions(pool, request["event_id"]), timeout=30, what="the request's routing decisions"
        )
        subscribed = {
            agency: outcome for agency, outcome in decisions.items() if "SUBSCRIPTION" not in outcome
        }
        assert subscribed == {"dvla": "WITHHELD_NO_CONSENT", "hmpo": "DELIVERED"}
        assert await copy_for("dvla") is None

        # The informant's page shows the Passport Office told, and offers only DVLA now.
        async def told() -> str | None:
            page = text_of((await client.get(f"{stack.base_url}/tell-us-once/registration")).text)
            return (
                page
                if re.search(r"HM Passport Office They were told\. They (confirmed|could)", page)
                else None
            )

        page = await eventually(told, timeout=60, what="the Passport Office's answer on the informant's page")
        assert "HM Passport Office They were told. They confirmed they have updated their records." in page
        assert "HM Passport Office You asked them to be told on" in page
        form = text_of((await client.get(f"{stack.base_url}/tell-us-once/services")).text)
        assert "Driver and Vehicle Licensing Agency" in form and "HM Passport Office" not in form

    # An operator replays the request to the Passport Office (it lost a day): the same copy
    # again, the passport number and nothing more; DVLA, which was not asked, gets nothing.
    replays = {}
    for agency, sent_line, withheld_line in [
        ("hmpo", "1 of 1 events sent", None),
        ("dvla", "0 of 1 events sent", "1 no consent today"),
    ]:
        code, output = await asyncio.to_thread(
            tuo_cli,
            services,
            *("replay", "run", agency, "--reference", request_reference.group(0)),
            *("--reason", "the agency restored a backup"),
        )
        assert code == 0, output
        assert sent_line in output, output
        assert withheld_line is None or withheld_line in output, output
        replays[agency] = next(line for line in output.splitlines() if line.startswith("Replay "))
    replayed = [
        record
        for record in await read_topic(services, topics.agency("hmpo"))
        if header(record, "ce_id") == str(request["event_id"]) and header(record, REPLAY_ID_HEADER)
    ]
    assert len(replayed) == 1
    assert f"Replay {header(replayed[0], REPLAY_ID_HEADER)}" in replays["hmpo"]
    assert decode(replayed[0].value or b"")[1] == sent_to_hmpo
    assert await copy_for("dvla") is None


async def follow_ups(pool: asyncpg.Pool, reference: str) -> int:
    """How many events were recorded after a registration, about it (requests, corrections)."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM intake_record WHERE follows_event_id ="
        " (SELECT event_id FROM intake_record WHERE reference = $1)",
        reference,
    )
    return count


async def _decisions(pool: asyncpg.Pool, event_id: uuid.UUID) -> dict[str, str] | None:
    rows = await pool.fetch("SELECT agency, outcome FROM routing_decision WHERE event_id = $1", event_id)
    return {r["agency"]: r["outcome"] for r in rows} or None


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (
            {},
            {
                "agencies": "Choose at least one organisation to tell",
                "permission": "Confirm that you have permission to give these details, to continue",
            },
        ),
        (
            {"agencies": "dvla", "permission": "yes"},
            {"driving_licence_number": "Enter the driving licence number"},
        ),
        (
            {"agencies": "dvla", "driving_licence_number": "SMITH403021PJ9AB", "permission": "yes"},
            {
                "driving_licence_number": "The driving licence number does not match the surname registered:"
                " check the licence"
            },
        ),
        (
            {"agencies": "dvla", "driving_licence_number": "EXAMP403031PJ9AB", "permission": "yes"},
            {
                "driving_licence_number": "The driving licence number does not match"
                " the date of birth registered: check the licence"
            },
        ),
        (
            {"agencies": "hmpo", "passport_number": "<script>alert(1)</script>", "permission": "yes"},
            {"passport_number": NOT_A_PASSPORT},
        ),
        (
            {"agencies": "hmpo", "passport_number": "9" * 100_000, "permission": "yes"},
            {"passport_number": NOT_A_PASSPORT},
        ),
        (
            {
                "agencies": "hmpo",
                "passport_number": PASSPORT,
                "driving_licence_number": LICENCE,
                "permission": "yes",
            },
            {"driving_licence_number": "No organisation chosen needs it"},
        ),
        (
            {"agencies": "hmrc", "permission": "yes"},
            {"agencies": "Choose the organisations to tell from the list"},
        ),
        (
            {"agencies": "dvla' OR 1=1 --", "permission": "yes"},
            {"agencies": "Choose the organisations to tell from the list"},
        ),
        (
            {"agencies": "hmpo", "passport_number": PASSPORT},
            {"permission": "Confirm that you have permission to give these details, to continue"},
        ),
    ],
)
async def test_wrong_missing_oversized_and_hostile_answers_get_linked_errors_and_tell_no_one(
    stack: Stack,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    answers: dict[str, str],
    expected: dict[str, str],
) -> None:
    async with browser() as client:
        reference, csrf = await opened(client, stack, intake)
        for path in ("/tell-us-once/services", "/tell-us-once/services/confirm"):
            refused = await client.post(f"{stack.base_url}{path}", data={"csrf_token": csrf, **answers})
            assert refused.status_code == 400, text_of(refused.text)
            assert error_links(refused.text) == expected
            assert len(refused.text) < 40_000, "an oversized answer is not echoed back whole"
        # The right answers without the session's CSRF token are refused too.
        forged = await client.post(
            f"{stack.base_url}/tell-us-once/services/confirm",
            data={
                "csrf_token": "guess",
                "agencies": "hmpo",
                "passport_number": PASSPORT,
                "permission": "yes",
            },
        )
        assert forged.status_code == 403
    assert await follow_ups(pool, reference) == 0


async def test_without_an_informant_session_the_services_pages_ask_for_the_reference(stack: Stack) -> None:
    async with browser() as client:
        form = await client.get(f"{stack.base_url}/tell-us-once/services")
        assert form.status_code == 303 and form.headers["location"] == "/tell-us-once/reference"
        sent = await client.post(
            f"{stack.base_url}/tell-us-once/services/confirm",
            data={"agencies": "hmpo", "passport_number": PASSPORT, "permission": "yes"},
        )
        assert sent.status_code == 303 and sent.headers["location"] == "/tell-us-once/reference"
