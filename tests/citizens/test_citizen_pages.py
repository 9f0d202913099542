"""The citizens' pages over real HTTP, signed in at the development provider, against
the real PostgreSQL (and, for "who received my data", the running bus): each person
sees and changes only their own choices; a proxy only what their appointment covers."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from citizens.pages import install_citizen_pages
from citizens.proxies import InvalidAppointment, appoint_proxy, appoint_proxy_by_nino
from devstack.dev_idp import TEST_IDENTITIES
from router.consent_receipts import (
    JWKS_PATH,
    issue_consent_receipt,
    published_keys,
    verify_consent_receipt,
)
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.citizen_browser import Stack, browser, serve_citizens, sign_in, whoami
from tests.support import death_registration, eventually, tuo_cli

pytestmark = pytest.mark.integration

JO, CHRIS, AMARA = TEST_IDENTITIES


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool, install_citizen_pages) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


def subject_of(stack: Stack, nino: str) -> str:
    return subject_id_for(nino, stack.settings.require_pseudonym_key())


async def signed_in(client: httpx.AsyncClient, stack: Stack, identity: str) -> str:
    """Sign ``client`` in as ``identity``; its CSRF token."""
    assert (await sign_in(client, stack, identity)).status_code == 303
    csrf: str = (await whoami(client, stack)).json()["csrf"]
    return csrf


async def consent_rows(pool: asyncpg.Pool, subject_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT agency, event_type, choice, recorded_by FROM consent_record"
        " WHERE subject_id = $1 ORDER BY id",
        subject_id,
    )
    return [dict(row) for row in rows]


def receipt_in(page: str) -> str:
    found = re.search(r'<textarea[^>]*name="receipt"[^>]*>\s*([A-Za-z0-9_.-]+)\s*</textarea>', page)
    assert found, "the confirmation page shows the receipt"
    return found.group(1)


def text_of(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", page))


async def change(
    client: httpx.AsyncClient,
    stack: Stack,
    csrf: str,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
    acting_for: str | None = None,
) -> httpx.Response:
    form = {
        "csrf_token": csrf,
        "subject_id": subject_id,
        "agency": agency,
        "event_type": event_type,
        "choice": choice,
    }
    if acting_for:
        form["for"] = acting_for
    return await client.post(f"{stack.base_url}/citizen/consents", data=form)


async def test_a_citizen_changes_a_consent_and_gets_a_receipt_that_verifies(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    jo = subject_of(stack, JO.nino)
    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        page = await client.get(f"{stack.base_url}/citizen/consents")
        assert page.status_code == 200
        text = text_of(page.text)
        assert "Driver and Vehicle Licensing Agency" in text
        assert (
            "Always told, because the law requires it: Social Security Administration Act 1992 s.124" in text
        )
        before = len(await consent_rows(pool, jo))

        saved = await change(client, stack, csrf, jo, "dvla", "AddressChanged", "given")
        assert saved.status_code == 200, saved.text
        assert "Your choice is saved" in saved.text and JWKS_PATH in saved.text
        claims = verify_consent_receipt(receipt_in(saved.text), await published_keys(pool))
        assert claims["sub"] == jo
        assert claims["consentChange"]["recordedBy"] == "citizen"
        assert claims["consentChange"]["choice"] == "given"

        withdrawn = await change(client, stack, csrf, jo, "dvla", "AddressChanged", "no")
        assert withdrawn.status_code == 200
        rows = await consent_rows(pool, jo)
        assert rows[before:] == [
            {"agency": "dvla", "event_type": "AddressChanged", "choice": "given", "recorded_by": "citizen"},
            {
                "agency": "dvla",
                "event_type": "AddressChanged",
                "choice": "withdrawn",
                "recorded_by": "citizen",
            },
        ]

        history = text_of((await client.get(f"{stack.base_url}/citizen/history")).text)
        assert "No, consent withdrawn" in history and "You, online" in history
        assert history.index("No, consent withdrawn") < history.index("Yes, they may be told")


async def test_statutory_sharing_unknown_sharing_a_forged_form_and_another_subject_are_refused(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    jo, chris = subject_of(stack, JO.nino), subject_of(stack, CHRIS.nino)
    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        before = await consent_rows(pool, jo), await consent_rows(pool, chris)
        statutory = await change(client, stack, csrf, jo, "dwp", "DeathRegistered", "no")
        assert statutory.status_code == 400
        assert "The law requires us to tell Department for Work and Pensions" in text_of(statutory.text)
        unknown = await change(client, stack, csrf, jo, "mi5", "DeathRegistered", "given")
        assert unknown.status_code == 400
        forged = await change(client, stack, "not-the-token", jo, "dvla", "AddressChanged", "given")
        assert forged.status_code == 403
        someone_else = await change(client, stack, csrf, chris, "dvla", "AddressChanged", "given")
        assert someone_else.status_code == 403
        assert "only change choices for yourself" in someone_else.text
        assert (await consent_rows(pool, jo), await consent_rows(pool, chris)) == before


async def test_the_received_page_shows_each_agencys_decision_for_the_persons_event(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    jo = subject_of(stack, JO.nino)
    body = death_registration(
        deceased={
            "given_names": "Jo",
            "family_name": "Citizen",
            "date_of_birth": "1950-01-01",
            "nino": JO.nino,
        }
    )
    answer = await intake.post("/v1/death-registrations", json=body)
    assert answer.status_code == 201, answer.text
    reference = answer.json()["reference"]
    assert await pool.fetchval("SELECT subject_id FROM intake_record WHERE reference = $1", reference) == jo

    async def decided() -> bool:
        count: int = await pool.fetchval(
            "SELECT count(*) FROM routing_decision d JOIN intake_record i USING (event_id)"
            " WHERE i.reference = $1 AND d.agency IN ('hmrc', 'hmpo', 'dvla')",
            reference,
        )
        return count == 3

    await eventually(decided, timeout=60, what="routing decisions for the registration")
    async with browser() as client:
        await signed_in(client, stack, JO.sub)
        page = await client.get(f"{stack.base_url}/citizen/received")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "Death registered, recorded" in text
    assert reference not in text
    assert "HM Revenue and Customs" in text and "They were told." in text
    assert "Required by law: Registration Service Act 1953 s.19AA" in text
    assert "National Insurance number" in text  # a field hmrc is given
    # The informant refused HM Passport Office at the desk.
    assert "Not told: they may only be told with consent, and consent was not given." in text
    async with browser() as client:
        await signed_in(client, stack, JO.sub)
        history = text_of((await client.get(f"{stack.base_url}/citizen/history")).text)
    assert "The informant, at the register office" in history


async def test_another_person_sees_and_downloads_only_their_own(stack: Stack, pool: asyncpg.Pool) -> None:
    jo, chris = subject_of(stack, JO.nino), subject_of(stack, CHRIS.nino)
    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        assert (await change(client, stack, csrf, jo, "hmpo", "DeathRegistered", "given")).status_code == 200
        own = await client.get(f"{stack.base_url}/citizen/download")
    assert own.status_code == 200
    assert own.headers["content-disposition"].startswith("attachment;")
    mine = own.json()
    assert mine["subject_id"] == jo and chris not in own.text
    assert any(c["agency"] == "hmpo" and c["choice"] == "given" for c in mine["consent_history"])
    assert {"consents", "consent_history", "events"} <= mine.keys()

    async with browser() as client:
        await signed_in(client, stack, CHRIS.sub)
        theirs = (await client.get(f"{stack.base_url}/citizen/download")).json()
        received = text_of((await client.get(f"{stack.base_url}/citizen/received")).text)
        history = text_of((await client.get(f"{stack.base_url}/citizen/history")).text)
        consents = text_of((await client.get(f"{stack.base_url}/citizen/consents")).text)
    assert theirs["subject_id"] == chris and jo not in str(theirs)
    assert all(not c["agency"] == "hmpo" or c["choice"] is None for c in theirs["consents"])
    assert theirs["events"] == [] and "No life events have been recorded about you." in received
    assert "No choices have been recorded yet." in history
    assert jo not in consents and "Not asked yet" in consents


async def test_a_proxy_acts_only_within_the_appointment_and_is_recorded_as_proxy(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    chris, amara = subject_of(stack, CHRIS.nino), subject_of(stack, AMARA.nino)
    # As an operator records it, knowing both people by NINO.
    appointment = await appoint_proxy_by_nino(
        pool,
        stack.settings,
        proxy_nino="ce 11 22 33 d",
        subject_nino=AMARA.nino,
        subject_name="Amara Okafor",
        agencies=["dvla"],
        recorded_by="test operator",
        reason="Lasting power of attorney, registered 2026",
    )
    lapsed = await appoint_proxy(
        pool,
        stack.settings,
        proxy_subject_id=chris,
        subject_id=amara,
        subject_name="Amara Okafor",
        agencies=None,
        recorded_by="test operator",
        reason="An appointment that has ended",
        valid_from=datetime.now(UTC) - timedelta(days=2),
        valid_to=datetime.now(UTC) - timedelta(days=1),
    )
    async with browser() as client:
        csrf = await signed_in(client, stack, CHRIS.sub)
        home = await client.get(f"{stack.base_url}/citizen")
        assert (
            f"/citizen/act-for/{appointment}" in home.text and f"/citizen/act-for/{lapsed}" not in home.text
        )
        chosen = await client.get(f"{stack.base_url}/citizen/act-for/{appointment}")
        assert (
            chosen.status_code == 303 and chosen.headers["location"] == f"/citizen/consents?for={appointment}"
        )
        assert (await client.get(f"{stack.base_url}/citizen/act-for/{lapsed}")).status_code == 403

        page = text_of((await client.get(f"{stack.base_url}/citizen/consents?for={appointment}")).text)
        assert "You are acting for Amara Okafor" in page
        assert "Driver and Vehicle Licensing Agency" in page and "HM Revenue and Customs" not in page

        before = await consent_rows(pool, amara)
        outside = await change(
            client, stack, csrf, amara, "hmrc", "AddressChanged", "given", str(appointment)
        )
        assert outside.status_code == 400
        without_appointment = await change(client, stack, csrf, amara, "dvla", "AddressChanged", "given")
        assert without_appointment.status_code == 403
        assert await consent_rows(pool, amara) == before

        saved = await change(client, stack, csrf, amara, "dvla", "AddressChanged", "given", str(appointment))
        assert saved.status_code == 200, saved.text
        claims = verify_consent_receipt(receipt_in(saved.text), await published_keys(pool))
        assert claims["sub"] == amara and claims["consentChange"]["recordedBy"] == "proxy"
        assert claims["collectionMethod"] == "Online, by a proxy the citizen appointed"
        assert (await consent_rows(pool, amara))[len(before) :] == [
            {"agency": "dvla", "event_type": "AddressChanged", "choice": "given", "recorded_by": "proxy"}
        ]
        under = await pool.fetchval(
            "SELECT appointment_id FROM consent_record WHERE subject_id = $1 ORDER BY id DESC LIMIT 1", amara
        )
        assert under == appointment, "the change names the appointment it was made under"
        download = (await client.get(f"{stack.base_url}/citizen/download?for={appointment}")).json()
        assert download["subject_id"] == amara and download["agencies_covered"] == ["dvla"]
        assert {c["agency"] for c in download["consents"]} == {"dvla"}
        # Chris's own pages are still Chris's.
        assert (await client.get(f"{stack.base_url}/citizen/download")).json()["subject_id"] == chris

    async with browser() as client:
        await signed_in(client, stack, AMARA.sub)
        history = text_of((await client.get(f"{stack.base_url}/citizen/history")).text)
    assert "Someone appointed to act for you, online" in history

    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        assert (await client.get(f"{stack.base_url}/citizen/act-for/{appointment}")).status_code == 403
        assert (await client.get(f"{stack.base_url}/citizen/consents?for={appointment}")).status_code == 403
        stolen = await change(
            client, stack, csrf, amara, "dvla", "AddressChanged", "refused", str(appointment)
        )
        assert stolen.status_code == 403
    assert len(await consent_rows(pool, amara)) == len(before) + 1


async def test_an_appointment_must_name_two_people_by_pseudonym_and_say_why(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    chris = subject_of(stack, CHRIS.nino)
    attempts: list[dict[str, Any]] = [
        {"proxy_subject_id": CHRIS.nino, "subject_id": chris},
        {"proxy_subject_id": chris, "subject_id": chris},
        {"proxy_subject_id": chris, "subject_id": subject_of(stack, AMARA.nino), "reason": " "},
        {"proxy_subject_id": chris, "subject_id": subject_of(stack, AMARA.nino), "agencies": ["HMRC"]},
    ]
    before = await pool.fetchval("SELECT count(*) FROM proxy_appointment")
    for attempt in attempts:
        with pytest.raises(InvalidAppointment):
            await appoint_proxy(
                pool,
                stack.settings,
                **{
                    "subject_name": "Someone",
                    "agencies": None,
                    "recorded_by": "test operator",
                    "reason": "a test",
                    **attempt,
                },
            )
    assert await pool.fetchval("SELECT count(*) FROM proxy_appointment") == before
    stored = await pool.fetch("SELECT t::text AS row FROM proxy_appointment t")
    assert not any(nino in row["row"] for row in stored for nino in (JO.nino, CHRIS.nino, AMARA.nino))
    assert not any("Amara" in row["row"] for row in stored)  # the name is sealed


async def test_pages_need_a_signed_in_citizen(stack: Stack) -> None:
    async with browser() as client:
        for path in ("/citizen/consents", "/citizen/history", "/citizen/received", "/citizen/download"):
            answer = await client.get(f"{stack.base_url}{path}")
            assert answer.status_code == 303
            assert answer.headers["location"] == f"/citizen/sign-in?next={path}"


async def test_tuo_proxies_appoint_prompts_for_ninos_keeps_none_and_end_stops_the_appointment(
    services: Settings, pool: asyncpg.Pool
) -> None:
    reason = "Lasting power of attorney " + uuid.uuid4().hex[:8]
    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        "proxies",
        "appoint",
        "--name",
        "Amara",
        "--reason",
        reason,
        "--recorded-by",
        "ops-test",
        "--agency",
        "dvla",
        "--days",
        "30",
        input="CE112233D\nAB987654C\n",
    )
    assert code == 0, output
    assert "CE112233D" not in output and "AB987654C" not in output, "hidden input is not echoed"
    row = await pool.fetchrow(
        "SELECT id, agencies, ended_at FROM proxy_appointment WHERE reason = $1", reason
    )
    assert row is not None and row["agencies"] == ["dvla"] and row["ended_at"] is None
    assert f"/citizen/act-for/{row['id']}" in output
    stored = await pool.fetchval(
        "SELECT row_to_json(a)::text FROM proxy_appointment a WHERE id = $1", row["id"]
    )
    assert "CE112233D" not in stored and "Amara" not in stored

    code, output = await asyncio.to_thread(tuo_cli, services, "proxies", "end", str(row["id"]))
    assert code == 0 and "ended" in output, output
    assert await pool.fetchval("SELECT ended_at FROM proxy_appointment WHERE id = $1", row["id"]) is not None
    code, output = await asyncio.to_thread(tuo_cli, services, "proxies", "end", str(row["id"]))
    assert code != 0 and "no running appointment" in output

    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        "proxies",
        "appoint",
        "--name",
        "X",
        "--reason",
        "r",
        "--recorded-by",
        "ops",
        input="not a nino\nAB987654C\n",
    )
    assert code != 0 and "not a National Insurance number" in output, output


async def test_saving_without_a_choice_shows_the_form_again_with_an_error_linked_to_the_question(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    jo = subject_of(stack, JO.nino)
    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        before = await pool.fetchval("SELECT count(*) FROM consent_record WHERE subject_id = $1", jo)
        response = await change(client, stack, csrf, jo, "dvla", "AddressChanged", "")
    assert response.status_code == 400
    assert "<title>Error: " in response.text
    assert "There is a problem" in response.text
    assert 'href="#choice-dvla-AddressChanged"' in response.text
    assert 'id="choice-dvla-AddressChanged-error"' in response.text, "the message sits on the question"
    assert await pool.fetchval("SELECT count(*) FROM consent_record WHERE subject_id = $1", jo) == before


_RECEIPT_LINK = re.compile(r'href="/citizen/consent-receipts/([0-9a-f-]{36})(?:\?for=[0-9a-f-]+)?"')


def address_change(nino: str, consents: list[dict[str, str]]) -> dict[str, Any]:
    """A move the person reports at a register office desk."""
    return {
        "informant": {"name": "A caller at the desk", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": JO.given_name, "family_name": JO.family_name, "nino": nino},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {
            "lines": [f"{uuid.uuid4().int % 900 + 100} Sample Road"],
            "town": "Leeds",
            "postcode": "LS2 7AB",
        },
        "effective_date": (datetime.now(UTC).date() - timedelta(days=1)).isoformat(),
        "consents": consents,
    }


async def test_a_citizen_lists_and_downloads_every_consent_receipt_given_at_the_desk_or_online(
    stack: Stack, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    jo = subject_of(stack, JO.nino)
    desk = await intake.post(
        "/v1/address-changes", json=address_change(JO.nino, [{"agency": "hmrc", "choice": "given"}])
    )
    assert desk.status_code == 201, desk.text
    [desk_receipt] = desk.json()["consent_receipts"]

    async with browser() as client:
        csrf = await signed_in(client, stack, JO.sub)
        saved = await change(client, stack, csrf, jo, "council-leeds", "AddressChanged", "given")
        online_id = verify_consent_receipt(receipt_in(saved.text), await published_keys(pool))["jti"]

        listing = await client.get(f"{stack.base_url}/citizen/consent-receipts")
        assert listing.status_code == 200
        text = text_of(listing.text)
        assert "Your consent receipts" in text and "/privacy" in listing.text
        assert "HM Revenue and Customs" in text and "The informant, at the register office" in text
        assert "Leeds City Council" in text and "You, online" in text
        listed = _RECEIPT_LINK.findall(listing.text)
        assert listed.index(online_id) < listed.index(desk_receipt["receipt_id"]), "newest first"
        stored = await pool.fetchval("SELECT count(*) FROM consent_receipt WHERE subject_id = $1", jo)
        assert len(listed) == stored, "every receipt about Jo is listed, and nobody else's"

        download = await client.get(f"{stack.base_url}/citizen/consent-receipts/{desk_receipt['receipt_id']}")
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/jwt"
        assert download.headers["content-disposition"] == (
            f'attachment; filename="consent-receipt-{desk_receipt["receipt_id"]}.jwt"'
        )
        assert download.text == desk_receipt["receipt"]
        claims = verify_consent_receipt(download.text, await published_keys(pool))
        assert claims["sub"] == jo and claims["consentChange"]["recordedBy"] == "informant"

        everything = (await client.get(f"{stack.base_url}/citizen/download")).json()
        in_download = {r["receipt_id"]: r["receipt"] for r in everything["consent_receipts"]}
        assert in_download[desk_receipt["receipt_id"]] == desk_receipt["receipt"]
        assert online_id in in_download and len(in_download) == len(listed)


async def test_a_receipt_download_refuses_made_up_hostile_and_other_peoples_receipt_ids(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    chris = subject_of(stack, CHRIS.nino)
    chris_receipt = await issue_consent_receipt(
        pool,
        stack.settings,
        subject_id=chris,
        agency="dvla",
        event_type="AddressChanged",
        choice="given",
        recorded_by="citizen",
        recorded_at=datetime.now(UTC),
    )
    chris_receipt_id = verify_consent_receipt(chris_receipt, await published_keys(pool))["jti"]
    hostile = [
        chris_receipt_id,  # someone else's: as absent as a made-up one
        str(uuid.uuid4()),
        "not-a-receipt",
        "x" * 5_000,
        "..%2F..%2Fetc%2Fpasswd",
        "%27%20OR%20%271%27%3D%271",
        "%00",
        chris_receipt_id.upper() + "0",
    ]
    async with browser() as client:
        nobody = await client.get(f"{stack.base_url}/citizen/consent-receipts/{chris_receipt_id}")
        assert nobody.status_code == 303 and "/citizen/sign-in" in nobody.headers["location"]
        listing = await client.get(f"{stack.base_url}/citizen/consent-receipts")
        assert listing.status_code == 303

        await signed_in(client, stack, JO.sub)
        for receipt_id in hostile:
            refused = await client.get(f"{stack.base_url}/citizen/consent-receipts/{receipt_id}")
            assert refused.status_code == 404, receipt_id
            assert chris_receipt not in refused.text
            # An encoded slash makes another path, which no page answers; the rest reach the page.
            if "%2F" not in receipt_id:
                assert "There is no such receipt" in refused.text, receipt_id
        assert chris_receipt_id not in (await client.get(f"{stack.base_url}/citizen/consent-receipts")).text


async def test_a_proxy_lists_and_downloads_only_the_receipts_their_appointment_covers(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    jo = subject_of(stack, JO.nino)
    represented = f"n-{uuid.uuid4().hex}"
    appointment = await appoint_proxy(
        pool,
        stack.settings,
        proxy_subject_id=jo,
        subject_id=represented,
        subject_name="Sam Represented",
        agencies=["dvla"],
        recorded_by="test operator",
        reason="Lasting power of attorney for DVLA matters",
    )
    receipts = {}
    for agency in ("dvla", "hmrc"):
        token = await issue_consent_receipt(
            pool,
            stack.settings,
            subject_id=represented,
            agency=agency,
            event_type="AddressChanged",
            choice="given",
            recorded_by="informant",
            recorded_at=datetime.now(UTC),
        )
        receipts[agency] = verify_consent_receipt(token, await published_keys(pool))["jti"]
    async with browser() as client:
        await signed_in(client, stack, JO.sub)
        acting = f"?for={appointment}"
        listing = await client.get(f"{stack.base_url}/citizen/consent-receipts{acting}")
        assert listing.status_code == 200
        assert "You are acting for Sam Represented" in text_of(listing.text)
        assert _RECEIPT_LINK.findall(listing.text) == [receipts["dvla"]]
        base = f"{stack.base_url}/citizen/consent-receipts"
        assert (await client.get(f"{base}/{receipts['dvla']}{acting}")).status_code == 200
        assert (await client.get(f"{base}/{receipts['hmrc']}{acting}")).status_code == 404
        # Without acting for them, Jo's own pages know nothing of Sam's receipts.
        assert (await client.get(f"{base}/{receipts['dvla']}")).status_code == 404
        assert (await client.get(f"{base}?for=not-an-appointment")).status_code == 403
