"""A citizen in a real browser (Debian's Chromium, driven by Playwright): sign in at the
local stack's identity provider, withdraw consent for one agency, and see that a new
event about them was withheld from it — checked with axe-core on every page, and
against that agency's Kafka topic."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Page, async_playwright

from devstack.dev_idp import TEST_IDENTITIES
from operators.services import RunningBus
from router.consent_receipts import published_keys, verify_consent_receipt
from runtime.kafka import Topics
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.producers.test_browser import AXE, CHROMIUM, HEADLESS_ARGS, Audit, _need
from tests.support import eventually, header, read_topic, today

pytestmark = pytest.mark.integration

_, _, AMARA = TEST_IDENTITIES
DVLA = "Driver and Vehicle Licensing Agency"


def _address_change(nino: str) -> dict[str, Any]:
    """A move reported at a desk, the informant agreeing only to HMRC being told."""
    return {
        "informant": {"name": "A registrar's caller", "relationship": "self"},
        "channel": "desk",
        "person": {"given_names": AMARA.given_name, "family_name": AMARA.family_name, "nino": nino},
        "old_address": {"lines": ["3 Old Lane"], "town": "York", "postcode": "YO1 7HH"},
        "new_address": {
            "lines": [f"{uuid.uuid4().int % 900 + 100} Sample Road"],
            "town": "Leeds",
            "postcode": "LS2 7AB",
        },
        "effective_date": (today() - timedelta(days=1)).isoformat(),
        "consents": [{"agency": "hmrc", "choice": "given"}],
    }


async def _save_dvla_address_choice(page: Page, audit: Audit, choice: str) -> str:
    """Choose Yes or No for DVLA and changes of address; return the consent receipt."""
    await page.goto("/citizen/consents")
    await audit.check("my consents")
    form = page.locator(
        "form:has(input[name=agency][value=dvla]):has(input[name=event_type][value=AddressChanged])"
    )
    await form.get_by_label(choice, exact=True).check()
    await form.get_by_role("button").click()
    await page.wait_for_load_state()
    await audit.check(f"consent saved ({choice})")
    receipt = await page.locator("textarea").input_value()
    assert receipt.count(".") == 2, "a compact JWT"
    return receipt


async def test_a_citizen_withdraws_consent_and_a_new_event_is_withheld_from_that_agency(
    services: Settings, pool: asyncpg.Pool, bus: RunningBus, intake: httpx.AsyncClient
) -> None:
    chromium = _need(
        CHROMIUM, "install Debian's chromium (`bash scripts/setup.sh`, or apt-get install chromium)"
    )
    axe_source = _need(AXE, "run `npm ci` in the project (scripts/setup.sh does)").read_text()
    base = f"http://127.0.0.1:{bus.http_port}"
    subject = subject_id_for(AMARA.nino, services.require_pseudonym_key())
    started = time.monotonic()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=HEADLESS_ARGS)
        page = await browser.new_page(base_url=base)
        audit = Audit(page, axe_source)
        try:
            # Not signed in: off to the identity provider, and back to the page asked for.
            await page.goto("/citizen/consents")
            assert page.url.startswith(f"{services.oidc_issuer}/authorize?")
            await audit.check("identity provider (development)")
            await page.get_by_role("button", name=f"Sign in as {AMARA.name}").click()
            await page.wait_for_url("**/citizen/consents")

            given = await _save_dvla_address_choice(page, audit, "Yes")
            withdrawn = await _save_dvla_address_choice(page, audit, "No")
            keys = await published_keys(pool)
            assert verify_consent_receipt(given, keys)["consentChange"]["choice"] == "given"
            change = verify_consent_receipt(withdrawn, keys)["consentChange"]
            assert (change["choice"], change["recordedBy"], change["agency"]) == (
                "withdrawn",
                "citizen",
                "dvla",
            )

            await page.goto("/citizen/history")
            await audit.check("history")
            assert "withdrawn" in (await page.locator("main").inner_text()).lower()

            await page.get_by_role("link", name="Your consent receipts").click()
            await page.wait_for_url("**/citizen/consent-receipts")
            await audit.check("consent receipts")
            async with page.expect_download() as downloading:
                await page.get_by_role("link", name="Download").first.click()
            saved = await (await downloading.value).path()
            assert (
                verify_consent_receipt(saved.read_text(), keys)["jti"]
                == verify_consent_receipt(withdrawn, keys)["jti"]
            )

            # A registrar records a move for Amara; the informant agrees to HMRC only.
            accepted = await intake.post("/v1/address-changes", json=_address_change(AMARA.nino))
            assert accepted.status_code == 201, accepted.text
            event_id = accepted.json()["event_id"]

            async def decided() -> list[asyncpg.Record]:
                rows = await pool.fetch(
                    "SELECT agency, outcome FROM routing_decision WHERE event_id = $1", uuid.UUID(event_id)
                )
                return rows if {r["agency"] for r in rows} >= {"dvla", "hmrc"} else []

            decisions = {
                r["agency"]: r["outcome"] for r in await eventually(decided, what="routing decisions")
            }
            assert decisions["dvla"] == "WITHHELD_NO_CONSENT" and decisions["hmrc"] == "DELIVERED"

            await page.goto("/citizen/received")
            await audit.check("who received my data")
            dvla_card = page.locator(".govuk-summary-card", has_text=DVLA).first
            assert "consent was not given" in await dvla_card.inner_text()
            hmrc_card = page.locator(".govuk-summary-card", has_text="HM Revenue and Customs").first
            assert "Not told" not in await hmrc_card.inner_text()
        finally:
            await browser.close()
            print(
                f"\ncitizen browser test: {time.monotonic() - started:.1f}s, "
                f"axe-core checked {len(audit.pages)} pages: {audit.pages}"
            )
            for violation in audit.minor:
                where = f"({violation['impact']}) on {violation['page']}"
                print(f"  axe {where}: {violation['id']}: {violation['help']}")

    topics = Topics(services.topic_prefix)
    assert not [
        r for r in await read_topic(services, topics.agency("dvla")) if header(r, "ce_id") == event_id
    ], "DVLA's topic received the event after consent was withdrawn"
    on_hmrc = [r for r in await read_topic(services, topics.agency("hmrc")) if header(r, "ce_id") == event_id]
    assert len(on_hmrc) == 1, "HMRC, with consent, was told once"
    rows = await pool.fetch(
        "SELECT choice, recorded_by FROM consent_record WHERE subject_id = $1 AND agency = 'dvla'"
        " AND event_type = 'AddressChanged' ORDER BY id",
        subject,
    )
    assert [(r["choice"], r["recorded_by"]) for r in rows][-2:] == [
        ("given", "citizen"),
        ("withdrawn", "citizen"),
    ]
