"""The informant's journey by telephone: a contact-centre agent (a registrar account of
role agent) signs in at the registrars' sign-in and takes the informant through the same
journey, in the one web service as ``tuo run`` composes it, against the real PostgreSQL
and the running bus. What is asked for is recorded as by telephone, through that agent.
And the register office's side: its page for the registration shows what was asked
for, and it unlocks a reference that wrong dates of birth locked."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from citizens.informants import MAX_WRONG_ANSWERS
from operators.services import RunningBus
from producers.accounts import add_registrar
from router.store import original_event
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import decode
from tests.citizens.test_informant_journey import BORN, PASSPORT, WRONG_BORN, registered, text_of
from tests.producers.test_web_forms import PASSWORD, csrf, new_registrar, serve_web, sign_in, web_settings
from tests.support import eventually

pytestmark = pytest.mark.integration

PHONE = "/tell-us-once/phone"


@pytest.fixture(scope="module")
async def web(services: Settings, pool: asyncpg.Pool, bus: RunningBus) -> AsyncIterator[str]:
    async with serve_web(web_settings(services), pool) as base_url:
        yield base_url


def client_of(web: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=web, timeout=20, follow_redirects=False)


async def agent_signed_in(client: httpx.AsyncClient, pool: asyncpg.Pool) -> str:
    username = await new_registrar(pool, "agent")
    signed = await sign_in(client, username)
    assert signed.status_code == 303 and signed.headers["location"] == PHONE, signed.text
    return username


async def call_opened(agent: httpx.AsyncClient, pool: asyncpg.Pool, intake: httpx.AsyncClient) -> str:
    """A new agent signed in, with a call's journey opened on a new registration."""
    reference = await registered(intake)
    username = await agent_signed_in(agent, pool)
    assert (await agent.post(PHONE, data={"reference": reference, **BORN})).status_code == 303
    return username


async def test_an_agent_takes_the_call_and_the_request_is_recorded_as_by_telephone_through_them(
    web: str, services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with client_of(web) as agent:
        username = await agent_signed_in(agent, pool)
        # The desk's pages are not an agent's: they lead to the telephone journey.
        desk = await agent.get("/start")
        assert desk.status_code == 303 and desk.headers["location"] == PHONE
        form = await agent.get(PHONE)
        assert form.status_code == 200
        assert "By telephone, for the informant – Ada Registrar" in text_of(form.text)
        opened = await agent.post(PHONE, data={"reference": reference, **BORN})
        assert opened.status_code == 303 and opened.headers["location"] == "/tell-us-once/registration"
        overview = await agent.get("/tell-us-once/registration")
        # The agent sees what the journey needs, not what the registrar recorded.
        assert overview.status_code == 200 and "Example" not in overview.text and "1941" not in overview.text
        answers = {
            "csrf_token": csrf(await agent.get("/tell-us-once/services")),
            "agencies": "hmpo",
            "passport_number": PASSPORT,
            "permission": "yes",
        }
        sent = await agent.post("/tell-us-once/services/confirm", data=answers)
        assert sent.status_code == 200, text_of(sent.text)
        found = re.search(r"TUO-\d{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", text_of(sent.text).split("reference", 1)[1])
        assert found
    request = await original_event(pool, found.group(0))
    assert request is not None and request.event_type == "ServicesRequested"
    _, body = decode(PayloadSealer.from_settings(services).open(request.value, request.event_id))
    assert body["envelope"]["channel"] == "PHONE"
    assert body["envelope"]["provenance"]["recorded_by"] == f"agent:{username}"
    consent = await pool.fetchrow(
        "SELECT r.agency, r.recorded_by FROM consent_receipt c"
        "  JOIN consent_record r ON r.id = c.consent_record_id WHERE c.event_id = $1",
        request.event_id,
    )
    assert dict(consent) == {"agency": "hmpo", "recorded_by": "informant"}, "the consent is the informant's"

    # The registrar's page for the registration shows what the informant asked for, and
    # where the Passport Office has got to with it.
    username = f"leeds-{username}"[:40]
    await add_registrar(pool, username, "Lee Registrar", "leeds", "registrar", PASSWORD)
    async with client_of(web) as registrar:
        assert (await sign_in(registrar, username)).headers["location"] == "/start"

        async def shown() -> str | None:
            page = text_of((await registrar.get(f"/registrations/{reference}")).text)
            return (
                page
                if "HM Passport Office Done" in page.split("Asked for by the informant since", 1)[-1]
                else None
            )

        page = await eventually(shown, timeout=60, what="the request on the registrar's page")
    asked = page.split("Asked for by the informant since", 1)[1].split("Consent receipts", 1)[0]
    assert f", by telephone (reference {found.group(0)})" in asked
    assert "Driver and Vehicle Licensing Agency" not in asked, "only the organisations the informant chose"


async def test_only_a_signed_in_agent_opens_the_telephone_journey(
    web: str, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)
    async with client_of(web) as nobody:
        page = await nobody.get(PHONE)
        assert page.status_code == 303 and page.headers["location"] == "/sign-in?next=%2Ftell-us-once%2Fphone"
        refused = await nobody.post(PHONE, data={"reference": reference, **BORN})
        assert refused.status_code == 303 and "tuo-informant" not in refused.cookies
    async with client_of(web) as registrar:
        signed = await sign_in(registrar, await new_registrar(pool, "registrar"))
        assert signed.headers["location"] == "/start"
        page = await registrar.get(PHONE)
        assert page.status_code == 403 and "Only contact-centre agents" in page.text
        refused = await registrar.post(PHONE, data={"reference": reference, **BORN})
        assert refused.status_code == 403 and "tuo-informant" not in refused.cookies


async def test_the_calls_journey_closes_when_the_agent_is_no_longer_signed_in(
    web: str, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    async with client_of(web) as agent:
        username = await call_opened(agent, pool, intake)
        assert (await agent.get("/tell-us-once/registration")).status_code == 200
        await pool.execute("DELETE FROM web_session WHERE username = $1", username)  # signed out, or expired
        closed = await agent.get("/tell-us-once/registration")
        assert closed.status_code == 401 and "Sign in again as the agent who took this call" in closed.text
        # The informant's session it opened has ended too.
        assert await pool.fetchval("SELECT count(*) FROM informant_session WHERE agent = $1", username) == 0


async def test_the_office_that_gave_a_locked_reference_unlocks_it_on_its_page(
    web: str, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    reference = await registered(intake)  # by Leeds
    async with client_of(web) as informant:
        for _ in range(MAX_WRONG_ANSWERS):
            await informant.post("/tell-us-once/reference", data={"reference": reference, **WRONG_BORN})
        locked = await informant.post("/tell-us-once/reference", data={"reference": reference, **BORN})
        assert locked.status_code == 403 and "This reference is locked" in locked.text

    async def unlock(client: httpx.AsyncClient, **answers: str) -> httpx.Response:
        token = csrf(await client.get("/informant-references/unlock"))
        return await client.post("/informant-references/unlock", data={"csrf_token": token, **answers})

    async with client_of(web) as elsewhere:  # a registrar of another office
        await sign_in(elsewhere, await new_registrar(pool, "registrar"))
        refused = await unlock(elsewhere, reference=reference, checked="yes")
        assert refused.status_code == 422 and "This is not a reference your office gave" in refused.text
    username = f"leeds-{uuid.uuid4().hex[:12]}"
    await add_registrar(pool, username, "Lee Registrar", "leeds", "registrar", PASSWORD)
    async with client_of(web) as leeds:
        await sign_in(leeds, username)
        start = await leeds.get("/start")
        assert 'href="/informant-references/unlock"' in start.text
        for answers, message in (
            ({"reference": reference}, "Confirm that you have checked who is asking"),
            ({"reference": "<script>alert(1)</script>", "checked": "yes"}, "Enter the reference as it is"),
            ({"reference": "x" * 5_000, "checked": "yes"}, "Enter the reference as it is"),
        ):
            wrong = await unlock(leeds, **answers)
            assert wrong.status_code == 422 and message in wrong.text and "<script>alert" not in wrong.text
        forged = await leeds.post(
            "/informant-references/unlock",
            data={"csrf_token": "guess", "reference": reference, "checked": "yes"},
        )
        assert forged.status_code == 403
        assert await pool.fetchval(
            "SELECT locked_at IS NOT NULL FROM informant_reference_lock WHERE reference = $1", reference
        )
        done = await unlock(leeds, reference=reference.lower(), checked="yes")
        assert done.status_code == 200 and "The reference can be used again" in done.text
        again = await unlock(leeds, reference=reference, checked="yes")
        assert "This reference is not locked" in again.text
    async with client_of(web) as informant:
        opened = await informant.post("/tell-us-once/reference", data={"reference": reference, **BORN})
        assert opened.status_code == 303


async def test_a_call_ends_with_the_next_call_and_the_agent_signs_out_between_calls(
    web: str, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    async with client_of(web) as agent:
        username = await call_opened(agent, pool, intake)
        # Ending the call's journey (the layout's sign-out) leads to the next call, and
        # leaves the agent signed in.
        overview = await agent.get("/tell-us-once/registration")
        ended = await agent.post("/tell-us-once/sign-out", data={"csrf_token": csrf(overview)})
        assert ended.status_code == 200 and "The call's journey has ended" in text_of(ended.text)
        assert f'href="{PHONE}"' in ended.text and "Take the next call" in ended.text
        assert await pool.fetchval("SELECT count(*) FROM informant_session WHERE agent = $1", username) == 0
        form = await agent.get(PHONE)
        assert form.status_code == 200
        # Between calls, the page offers the agent's own sign-out: it needs their token.
        assert '<form method="post" action="/sign-out"' in form.text
        refused = await agent.post("/sign-out", data={"csrf_token": "guess"})
        assert refused.status_code in (400, 403)
        assert (await agent.get(PHONE)).status_code == 200, "a guessed token signs no one out"
        signed_out = await agent.post("/sign-out", data={"csrf_token": csrf(form)})
        assert signed_out.status_code == 303
        assert signed_out.headers["location"] == "/sign-in?reason=signed-out"
        after = await agent.get(PHONE)
        assert after.status_code == 303 and after.headers["location"].startswith("/sign-in")
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
