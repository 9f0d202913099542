"""The registrars' HTML forms over HTTP: sign-in, CSRF, error messages, one event
per submission however often it is sent, session expiry, hostile input.

The forms are served by the intake app with ``install_web``, on a port of their
own, against the real database; the whole bus runs alongside, so the
confirmation page can show each agency's decision and receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Generator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from markupsafe import escape

from operators.services import RunningBus
from operators.web import create_app
from producers.accounts import Role, add_registrar
from producers.web import install_web
from producers.web.forms import DEATH
from producers.web.routes import return_path
from router.consent_receipts import published_keys, verify_consent_receipt
from router.organisations import agency_statuses
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.support import WEB_FORMS_OFFICE, eventually, random_nino, today

pytestmark = pytest.mark.integration

OFFICE, OFFICE_NAME = WEB_FORMS_OFFICE  # made by the session's pool fixture
PASSWORD = "correct horse battery staple"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_SUBMISSION_ID = re.compile(r'name="submission_id" value="([^"]+)"')
_REFERENCE = re.compile(r"TUO-[0-9]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def serve_web(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    """The intake app with the forms installed, on a free port; yields its base URL."""
    app = create_app(settings, pool)
    install_web(app, settings)
    server = _EmbeddedServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            raise RuntimeError("the forms' server did not start")
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def web_settings(services: Settings) -> Settings:
    # httpx (rightly) keeps Secure cookies off plain http; production keeps the default.
    return services.model_copy(update={"session_cookie_secure": False})


async def new_registrar(pool: asyncpg.Pool, role: Role = "registrar") -> str:
    username = f"reg-{uuid.uuid4().hex[:12]}"
    await add_registrar(pool, username, "Ada Registrar", OFFICE, role, PASSWORD)
    return username


@pytest.fixture(scope="module")
async def web(services: Settings, pool: asyncpg.Pool, bus: RunningBus) -> AsyncIterator[str]:
    async with serve_web(web_settings(services), pool) as base_url:
        yield base_url


@pytest.fixture
async def browser(web: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps cookies, like a browser, and does not follow redirects."""
    async with httpx.AsyncClient(base_url=web, timeout=20, follow_redirects=False) as client:
        yield client


def csrf(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> httpx.Response:
    page = await client.get("/sign-in")
    return await client.post(
        "/sign-in", data={"csrf_token": csrf(page), "username": username, "password": password}
    )


async def signed_in(client: httpx.AsyncClient, pool: asyncpg.Pool, role: Role = "registrar") -> str:
    username = await new_registrar(pool, role)
    response = await sign_in(client, username)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/start"
    return username


async def session_token(client: httpx.AsyncClient) -> str:
    return csrf(await client.get("/start"))


def death_answers(**overrides: str) -> dict[str, str]:
    died = today() - timedelta(days=3)
    answers = {
        "deceased.given_names": "Pat",
        "deceased.family_name": "Example",
        "deceased.date_of_birth-day": "2",
        "deceased.date_of_birth-month": "3",
        "deceased.date_of_birth-year": "1941",
        "deceased.nino": random_nino(),
        "date_of_death-day": str(died.day),
        "date_of_death-month": str(died.month),
        "date_of_death-year": str(died.year),
        "place_of_death": "Leeds General Infirmary",
        "last_address.lines.0": "1 Example Street",
        "last_address.town": "Leeds",
        "last_address.postcode": "ls1 1aa",
        "informant.name": "Alex Example",
        "informant.relationship": "daughter",
        "channel": "desk",
    }
    answers.update(overrides)
    return answers


async def records_by(pool: asyncpg.Pool, username: str) -> int:
    """Intake records (with their outbox rows) written for this registrar."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM intake_record i JOIN outbox o USING (event_id) WHERE i.recorded_by = $1",
        f"registrar:{username}",
    )
    return count


async def to_check_page(
    client: httpx.AsyncClient, answers: dict[str, str], consents: dict[str, str] | None = None
) -> httpx.Response:
    """Fill in the death form and the organisations step; return the check-your-answers page."""
    token = await session_token(client)
    saved = await client.post("/register/death", data={"csrf_token": token, **answers})
    assert saved.status_code == 303, saved.text
    assert saved.headers["location"] == "/register/death/organisations"
    choices = consents if consents is not None else {"dvla": "given", "hmpo": "refused"}
    chosen = await client.post(
        "/register/death/organisations",
        data={"csrf_token": token, **{f"consent.{a}": c for a, c in choices.items()}},
    )
    assert chosen.status_code == 303, chosen.text
    check = await client.get("/register/death/check")
    assert check.status_code == 200, check.text
    return check


async def send(client: httpx.AsyncClient, check: httpx.Response, **override: str) -> httpx.Response:
    submission_id = _SUBMISSION_ID.search(check.text)
    assert submission_id
    data = {"csrf_token": csrf(check), "submission_id": submission_id.group(1), **override}
    return await client.post("/register/death/check", data=data)


async def test_every_page_needs_a_signed_in_registrar(browser: httpx.AsyncClient) -> None:
    for path in ("/start", "/register/death", "/register/birth/check", "/registrations/TUO-2026-0000-0000"):
        response = await browser.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/sign-in?next=")
    posted = await browser.post("/register/death/check", data={"submission_id": "x" * 30})
    assert posted.status_code == 303
    assert posted.headers["location"] == "/sign-in"
    assert (await browser.get("/")).headers["location"] == "/start"


async def test_wrong_password_and_unknown_username_get_the_same_message(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await new_registrar(pool)
    wrong_password = await sign_in(browser, username, "not the password at all")
    unknown_user = await sign_in(browser, f"nobody-{uuid.uuid4().hex[:8]}", PASSWORD)
    for response in (wrong_password, unknown_user):
        assert response.status_code == 422
        assert "Enter a correct username and password" in response.text
        assert response.text.count("Enter a correct username and password") == 2  # summary and field
        assert "<title>Error: Sign in" in response.text
        assert "tuo-session" not in response.headers.get("set-cookie", "")
    assert (await browser.get("/start")).status_code == 303


async def test_repeated_failures_stop_sign_in_for_a_while(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await new_registrar(pool)
    for _ in range(5):
        assert (await sign_in(browser, username, "wrong wrong wrong")).status_code == 422
    refused = await sign_in(browser, username)  # the right password, too late
    assert refused.status_code == 429
    assert "tried to sign in too many times" in refused.text
    await pool.execute(
        "UPDATE sign_in_failure SET first_failed_at = now() - interval '16 minutes' WHERE username = $1",
        username,
    )
    assert (await sign_in(browser, username)).status_code == 303


async def test_sign_in_without_its_cookie_token_is_refused(web: str, pool: asyncpg.Pool) -> None:
    username = await new_registrar(pool)
    async with httpx.AsyncClient(base_url=web) as client:
        response = await client.post(
            "/sign-in", data={"csrf_token": "made-up", "username": username, "password": PASSWORD}
        )
    assert response.status_code == 403
    assert "could not be accepted" in response.text


async def test_forms_without_the_sessions_csrf_token_are_refused_and_nothing_is_written(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    check = await to_check_page(browser, death_answers())
    submission_id = _SUBMISSION_ID.search(check.text)
    assert submission_id
    for token in (None, "", "x" * 43, csrf(check)[:-1] + ("A" if csrf(check)[-1] != "A" else "B")):
        data = {"submission_id": submission_id.group(1)}
        if token is not None:
            data["csrf_token"] = token
        refused = await browser.post("/register/death/check", data=data)
        assert refused.status_code == 403
        assert "Nothing has been recorded" in refused.text
    assert (await browser.post("/register/death", data=death_answers())).status_code == 403
    assert (await browser.post("/sign-out", data={})).status_code == 403
    assert await records_by(pool, username) == 0
    assert (await browser.get("/register/death/check")).status_code == 200  # still signed in, draft intact


async def test_a_mistake_shows_the_error_summary_and_the_field_message_and_writes_nothing(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    token = await session_token(browser)
    answers = death_answers(**{"deceased.nino": "12345", "date_of_death-month": "13"})
    response = await browser.post("/register/death", data={"csrf_token": token, **answers})
    assert response.status_code == 422
    page = response.text
    assert "<title>Error: Register a death" in page
    assert 'class="govuk-error-summary"' in page
    summary = page[page.index("govuk-error-summary__list") :]
    assert summary.index('href="#deceased-nino"') < summary.index('href="#date-of-death-day"')  # page order
    nino_message = "Enter the deceased’s National Insurance number in the correct format, like QQ 12 34 56 C"
    assert page.count(nino_message) == 2  # in the summary and beside the field
    assert 'id="deceased-nino-error"' in page
    assert 'aria-describedby="deceased-nino-hint deceased-nino-error"' in page
    assert "The date of death must be a real date" in page
    assert 'value="Leeds General Infirmary"' in page  # what was typed is kept
    assert await records_by(pool, username) == 0
    draft = await browser.get("/register/death/check")
    assert draft.headers["location"] == "/register/death"  # nothing saved as a draft either


async def test_statutory_organisations_are_told_and_consent_ones_are_asked(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await signed_in(browser, pool)
    token = await session_token(browser)
    await browser.post("/register/death", data={"csrf_token": token, **death_answers()})
    page = (await browser.get("/register/death/organisations")).text
    assert "HM Revenue and Customs" in page
    assert "required by Registration Service Act 1953 s.19AA" in page
    assert 'name="consent.hmrc"' not in page  # not optional
    assert "Leeds City Council" in page  # the address is in its area
    assert "Bradford" not in page  # it is not
    assert 'name="consent.dvla"' in page and 'name="consent.hmpo"' in page
    missing = await browser.post(
        "/register/death/organisations", data={"csrf_token": token, "consent.dvla": "given"}
    )
    assert missing.status_code == 422
    assert 'href="#consent-hmpo"' in missing.text
    assert "Select yes if the informant agrees that we tell HM Passport Office" in missing.text


async def test_the_councils_offered_are_those_of_the_address_by_local_authority_not_postcode_letters(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await signed_in(browser, pool)
    token = await session_token(browser)
    # LS29 0AA (Ilkley) starts LS but is in Bradford.
    answers = death_answers(**{"last_address.postcode": "ls29 0aa"})
    await browser.post("/register/death", data={"csrf_token": token, **answers})
    page = (await browser.get("/register/death/organisations")).text
    assert "City of Bradford Metropolitan District Council" in page
    assert "Leeds City Council" not in page
    assert "postcode-not-found" not in page
    # A postcode the directory does not know: no council, and the registrar is told why.
    answers = death_answers(**{"last_address.postcode": "LS99 9ZZ"})
    await browser.post("/register/death", data={"csrf_token": token, **answers})
    page = (await browser.get("/register/death/organisations")).text
    assert "Leeds City Council" not in page and "Bradford" not in page
    notice = re.sub(r"\s+", " ", page[page.index('id="postcode-not-found"') :])
    assert "We could not find the postcode <strong>LS99 9ZZ</strong> in the postcode directory" in notice
    assert "no council will be told" in notice
    assert "HM Revenue and Customs" in page, "national agencies are told wherever one lived"


async def test_a_death_registration_gets_a_reference_and_each_agencys_status(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    check = await to_check_page(browser, death_answers())
    assert "LS1 1AA" in check.text  # the postcode as it will be recorded
    assert "Yes, required by Registration Service Act 1953" in check.text
    sent = await send(browser, check)
    assert sent.status_code == 303
    reference = sent.headers["location"].removeprefix("/registrations/")
    assert _REFERENCE.fullmatch(reference)
    confirmation = await browser.get(sent.headers["location"])
    assert confirmation.status_code == 200
    assert "govuk-panel--confirmation" in confirmation.text
    assert reference in confirmation.text
    # What the informant can do with it: their own journey, for 28 days.
    told = "at /tell-us-once, which organisations were told and what each did, for 28 days"
    assert told in confirmation.text
    assert await records_by(pool, username) == 1
    channel = await pool.fetchval("SELECT recorded_by FROM intake_record WHERE reference = $1", reference)
    assert channel == f"registrar:{username}"

    async def answered() -> str | None:
        table = (await browser.get(f"/registrations/{reference}/agencies")).text
        return table if 'data-settled="true"' in table else None

    table = await eventually(answered, timeout=60, what="every agency to answer")
    assert "HM Revenue and Customs" in table and "Done" in table
    assert "The informant did not agree to tell them." in table  # HM Passport Office
    assert "Leeds City Council" in table
    assert "Bradford" not in table  # its subscription covers another area
    assert "HM Passport Office" in table


async def test_sending_twice_gives_one_event_and_the_same_reference(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    check = await to_check_page(browser, death_answers())
    double_click = await asyncio.gather(send(browser, check), send(browser, check))
    again = await send(browser, check)  # the browser's "resubmit the form?"
    locations = {r.headers["location"] for r in (*double_click, again)}
    assert {r.status_code for r in (*double_click, again)} == {303}
    assert len(locations) == 1
    assert await records_by(pool, username) == 1


async def test_changed_answers_are_a_new_submission(browser: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    username = await signed_in(browser, pool)
    first = await to_check_page(browser, death_answers())
    first_reference = (await send(browser, first)).headers["location"]
    second = await to_check_page(browser, death_answers(**{"deceased.given_names": "Sam"}))
    second_reference = (await send(browser, second)).headers["location"]
    assert first_reference != second_reference
    assert await records_by(pool, username) == 2


async def test_an_idle_session_expires_and_its_drafts_go_with_it(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    await to_check_page(browser, death_answers())
    await pool.execute(
        "UPDATE web_session SET last_seen_at = now() - interval '31 minutes' WHERE username = $1", username
    )
    response = await browser.get("/register/death/check")
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?next=%2Fregister%2Fdeath%2Fcheck&reason=expired"
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
    notice = await browser.get(response.headers["location"])
    assert "You were signed out because you had not used the service for a while" in notice.text
    again = await browser.post(
        "/sign-in",
        data={
            "csrf_token": csrf(notice),
            "username": username,
            "password": PASSWORD,
            "next": "/register/death",
        },
    )
    assert again.headers["location"] == "/register/death"


async def test_a_session_ends_after_its_maximum_lifetime_however_busy(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    await pool.execute(
        "UPDATE web_session SET created_at = now() - interval '11 hours' WHERE username = $1", username
    )
    assert (await browser.get("/start")).headers["location"].endswith("reason=expired")


async def test_sign_out_ends_the_session(browser: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    username = await signed_in(browser, pool)
    token = await session_token(browser)
    response = await browser.post("/sign-out", data={"csrf_token": token})
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?reason=signed-out"
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
    assert (await browser.get("/start")).status_code == 303


async def test_html_in_a_name_is_shown_as_text_and_overlong_values_get_a_field_message(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    hostile = '<script>alert("x")</script><b>Pat</b>'
    check = await to_check_page(browser, death_answers(**{"deceased.given_names": hostile}))
    assert hostile not in check.text
    assert str(escape(hostile)) in check.text  # shown as the text that was typed
    token = await session_token(browser)
    too_long = await browser.post(
        "/register/death", data={"csrf_token": token, **death_answers(**{"deceased.family_name": "X" * 5000})}
    )
    assert too_long.status_code == 422
    assert "The deceased’s family name must be 200 characters or fewer" in too_long.text
    control = await browser.post(
        "/register/death", data={"csrf_token": token, **death_answers(**{"place_of_death": "Leeds\x1b[2J"})}
    )
    assert "The place of death must not contain control characters" in control.text
    assert await records_by(pool, username) == 0


async def test_birth_and_change_of_address_forms_record_their_events(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    token = await session_token(browser)
    born = today() - timedelta(days=10)
    birth: dict[str, Any] = {
        "child.given_names": "Robin",
        "child.family_name": "Example",
        "child.date_of_birth-day": str(born.day),
        "child.date_of_birth-month": str(born.month),
        "child.date_of_birth-year": str(born.year),
        "place_of_birth": "St James's University Hospital",
        "registration_district": "Leeds",
        "parents.0.given_names": "Jo",
        "parents.0.family_name": "Example",
        "parents.0.relationship": "mother",
        "parents.1.given_names": "Sam",
        "parents.1.family_name": "Example",
        "parents.1.relationship": "father",
        "parents.1.date_of_birth-day": "1",
        "parents.1.date_of_birth-month": "1",
        "parents.1.date_of_birth-year": "1990",
        "home_address.lines.0": "2 Example Road",
        "home_address.town": "Leeds",
        "home_address.postcode": "LS6 2AB",
        "informant.name": "Jo Example",
        "informant.relationship": "mother",
        "channel": "phone",
    }
    assert (await browser.post("/register/birth", data={"csrf_token": token, **birth})).status_code == 303
    assert (
        await browser.post("/register/birth/organisations", data={"csrf_token": token})
    ).status_code == 303
    check = await browser.get("/register/birth/check")
    assert "Department for Work and Pensions" in check.text
    submission_id = _SUBMISSION_ID.search(check.text)
    assert submission_id
    sent = await browser.post(
        "/register/birth/check", data={"csrf_token": token, "submission_id": submission_id.group(1)}
    )
    assert "Birth registration recorded" in (await browser.get(sent.headers["location"])).text

    moved = today() - timedelta(days=5)
    move = {
        "person.given_names": "Kim",
        "person.family_name": "Example",
        "old_address.lines.0": "3 Old Street",
        "old_address.town": "Leeds",
        "old_address.postcode": "LS2 7EW",
        "new_address.lines.0": "3 Old Street",
        "new_address.town": "Leeds",
        "new_address.postcode": "LS2 7EW",
        "effective_date-day": str(moved.day),
        "effective_date-month": str(moved.month),
        "effective_date-year": str(moved.year),
        "informant.name": "Kim Example",
        "informant.relationship": "self",
        "channel": "desk",
    }
    same = await browser.post("/register/address", data={"csrf_token": token, **move})
    assert same.status_code == 422
    assert "The new address must be different from the old address" in same.text
    move["new_address.lines.0"] = "4 New Street"
    assert (await browser.post("/register/address", data={"csrf_token": token, **move})).status_code == 303
    chosen = await browser.post(
        "/register/address/organisations",
        data={
            "csrf_token": token,
            "consent.hmrc": "given",
            "consent.dvla": "refused",
            "consent.council-leeds": "given",
        }
        | {"consent.council-bradford": "refused"},
    )
    assert chosen.status_code == 303
    check = await browser.get("/register/address/check")
    submission_id = _SUBMISSION_ID.search(check.text)
    assert submission_id
    sent = await browser.post(
        "/register/address/check", data={"csrf_token": token, "submission_id": submission_id.group(1)}
    )
    assert "Change of address recorded" in (await browser.get(sent.headers["location"])).text
    assert await records_by(pool, username) == 2


async def test_pages_are_not_cached_and_allow_only_this_services_scripts(browser: httpx.AsyncClient) -> None:
    page = await browser.get("/sign-in")
    assert page.headers["cache-control"] == "no-store"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self' 'nonce-" in policy and "frame-ancestors 'none'" in policy
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in page.text
    assert 'autocomplete="current-password"' in page.text
    css = await browser.get("/assets/govuk-frontend.min.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for asset in (
        "/assets/govuk-frontend.min.js",
        "/assets/app/application.mjs",
        "/assets/images/favicon.svg",
    ):
        assert (await browser.get(asset)).status_code == 200, asset


async def test_unknown_pages_get_a_page_not_found_and_the_api_keeps_its_json(
    browser: httpx.AsyncClient,
) -> None:
    page = await browser.get("/no-such-page", headers={"Accept": "text/html"})
    assert page.status_code == 404
    assert "Page not found" in page.text and "govuk-template" in page.text
    api = await browser.get("/v1/no-such-thing", headers={"Accept": "application/json"})
    assert api.status_code == 404
    assert api.headers["content-type"].startswith("application/json")


async def test_a_reference_from_another_office_is_not_found(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await signed_in(browser, pool)
    other = await pool.fetchval(
        "SELECT reference FROM intake_record WHERE registration_office <> $1 LIMIT 1", OFFICE
    )
    for reference in (other or "TUO-2026-0000-0000", "<script>", "TUO-2026-0000-000%22"):
        response = await browser.get(f"/registrations/{reference}", headers={"Accept": "text/html"})
        assert response.status_code == 404


_RECEIPT_LINK = re.compile(r'href="(/registrations/(TUO-[0-9A-Z-]+)/consent-receipts/([0-9a-f-]{36}))"')


async def test_the_informants_choices_on_the_form_get_consent_receipts_to_hand_over(
    browser: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    await signed_in(browser, pool)
    answers = death_answers()
    sent = await send(browser, await to_check_page(browser, answers, {"dvla": "given", "hmpo": "refused"}))
    assert sent.status_code == 303
    confirmation = await browser.get(sent.headers["location"])
    assert "Download the receipt for Driver and Vehicle Licensing Agency (consent given)" in confirmation.text
    assert "Download the receipt for HM Passport Office (consent refused)" in confirmation.text
    links = _RECEIPT_LINK.findall(confirmation.text)
    assert len(links) == 2

    keys = await published_keys(pool)
    subject = subject_id_for(answers["deceased.nino"], services.require_pseudonym_key())
    choices = {}
    for link, _, receipt_id in links:
        download = await browser.get(link)
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/jwt"
        assert f'filename="consent-receipt-{receipt_id}.jwt"' in download.headers["content-disposition"]
        claims = verify_consent_receipt(download.text, keys)
        assert claims["sub"] == subject and claims["jti"] == receipt_id
        assert claims["collectionMethod"] == "In person, by the informant at the register office desk"
        assert claims["consentChange"]["recordedBy"] == "informant"
        choices[claims["consentChange"]["agency"]] = claims["consentChange"]["choice"]
    assert choices == {"dvla": "given", "hmpo": "refused"}

    # Another registration's receipt, a made-up one, or a hostile id: not found.
    _, reference, receipt_id = links[0]
    other = await pool.fetchval(
        "SELECT i.reference FROM intake_record i WHERE i.registration_office = $1 AND i.reference <> $2"
        " LIMIT 1",
        OFFICE,
        reference,
    )
    for path in (
        f"/registrations/{other or 'TUO-2026-0000-0000'}/consent-receipts/{receipt_id}",
        f"/registrations/{reference}/consent-receipts/{uuid.uuid4()}",
        f"/registrations/{reference}/consent-receipts/not-a-receipt",
        f"/registrations/{reference}/consent-receipts/{'x' * 5000}",
        f"/registrations/{reference}/consent-receipts/%27%20OR%20%271%27%3D%271",
    ):
        refused = await browser.get(path, headers={"Accept": "text/html"})
        assert refused.status_code == 404, path
        assert "eyJ" not in refused.text, "no receipt (a JWT starts eyJ) in the answer"
    async with httpx.AsyncClient(base_url=str(browser.base_url), timeout=20) as stranger:
        nobody = await stranger.get(links[0][0])
    assert nobody.status_code == 303 and nobody.headers["location"].startswith("/sign-in")


@pytest.mark.parametrize(
    ("day", "month", "year", "message"),
    [
        ("", "3", "2026", "The date of death must include a day"),
        ("1", "", "", "The date of death must include a month and year"),
        ("31", "2", "2025", "The date of death must be a real date"),
        ("1", "2", "25", "The date of death must include a year with 4 numbers, like 1950"),
        ("first", "2", "2025", "The date of death must be a real date"),
        ("1", "1", str(today().year + 1), "The date of death must be today or in the past"),
    ],
)
def test_a_date_says_what_is_missing_or_wrong(day: str, month: str, year: str, message: str) -> None:
    answers = death_answers(
        **{"date_of_death-day": day, "date_of_death-month": month, "date_of_death-year": year}
    )
    _, errors = DEATH.check(answers)
    assert [(e.message, e.href) for e in errors] == [(message, "#date-of-death-day")]


def test_each_agencys_decision_and_receipt_are_put_in_words() -> None:
    def row(
        agency: str,
        decision: str,
        receipt: str | None = None,
        reason: str | None = None,
        overdue: bool = False,
    ) -> dict[str, Any]:
        return {
            "agency": agency,
            "decision": decision,
            "receipt": None if receipt is None else {"outcome": receipt, "reason": reason},
            "overdue": overdue,
        }

    status = {
        "agencies": [
            row("hmrc", "delivered", "applied"),
            row("dvla", "delivered"),
            row("hmpo", "withheld_no_consent"),
            row("council-bradford", "withheld_no_subscription"),
            row("dwp", "delivered", "rejected", "no such person"),
            row("council-york", "blocked"),
            row("council-leeds", "delivered", "received", overdue=True),
        ]
    }
    words = {s.name: (s.status, s.detail, s.settled) for s in agency_statuses(status)}
    assert words == {
        "HM Revenue and Customs": ("Done", "They have updated their records.", True),
        "Driver and Vehicle Licensing Agency": ("Sent", "Waiting for them to confirm they have it.", False),
        "HM Passport Office": ("Not told", "The informant did not agree to tell them.", True),
        "Department for Work and Pensions": ("Rejected", "They could not use it: no such person.", True),
        "York Council": ("Not told", "The law does not allow telling them.", True),
        "Leeds City Council": (
            "Overdue",
            "They have not confirmed in time. It is flagged for the operators, who can send it again.",
            False,
        ),
    }


@pytest.mark.parametrize(
    ("asked", "allowed"),
    [
        ("/register/death", "/register/death"),
        ("/register/death/check", "/register/death/check"),
        ("//evil.example/register", None),
        ("https://evil.example/start", None),
        ("/sign-out", None),
        ("/start\r\nSet-Cookie: x=y", None),
        (None, None),
    ],
)
def test_sign_in_only_returns_to_this_services_own_pages(asked: str | None, allowed: str | None) -> None:
    assert return_path(asked) == allowed


async def test_draft_answers_are_sealed_in_the_database_and_still_shown_back(
    browser: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    family_name = "Sealed" + uuid.uuid4().hex[:8]
    answers = death_answers(**{"deceased.family_name": family_name})
    check = await to_check_page(browser, answers)
    assert family_name in check.text, "the check page shows the draft back"
    stored = await pool.fetchval("SELECT data::text FROM web_session WHERE username = $1", username)
    assert stored and stored != "{}", "the draft is in the session"
    for value in (family_name, answers["deceased.nino"], "Example Street", "ls1 1aa"):
        assert value not in stored, f"{value!r} is in the session row in clear"
