"""The informant's journey in a real browser (Debian's Chromium, driven by Playwright),
by keyboard only, against the running bus: from the start page, through a wrong date of
birth and its error summary, to the registration's page, through asking one more
organisation to be told (with a detail left out, then given), and out again — checked with
axe-core and the content security policy on every page."""

from __future__ import annotations

import time

import httpx
import pytest
from playwright.async_api import Page, async_playwright

from operators.services import RunningBus
from tests.producers.test_browser import AXE, CHROMIUM, HEADLESS_ARGS, Audit, _need
from tests.support import death_registration

pytestmark = pytest.mark.integration


async def _tab_to(page: Page, selector: str, limit: int = 40) -> None:
    """Press Tab until ``selector`` has the focus, as a keyboard user would."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        if await page.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return
    raise AssertionError(f"{selector} cannot be reached with the Tab key")


async def _answer(page: Page, reference: str, day: str, month: str, year: str) -> None:
    await _tab_to(page, "#reference")
    await page.keyboard.press("Control+A")
    await page.keyboard.type(reference)
    for field, value in (("#born-day", day), ("#born-month", month), ("#born-year", year)):
        await _tab_to(page, field)
        await page.keyboard.press("Control+A")
        await page.keyboard.type(value)
    async with page.expect_navigation():
        await page.keyboard.press("Enter")  # submits the form, as the Continue button would


async def test_an_informant_opens_the_registration_by_keyboard_on_accessible_pages(
    bus: RunningBus, intake: httpx.AsyncClient
) -> None:
    chromium = _need(
        CHROMIUM, "install Debian's chromium (`bash scripts/setup.sh`, or apt-get install chromium)"
    )
    axe_source = _need(AXE, "run `npm ci` in the project (scripts/setup.sh does)").read_text()
    answer = await intake.post("/v1/death-registrations", json=death_registration())
    assert answer.status_code == 201, answer.text
    reference = answer.json()["reference"]
    started = time.monotonic()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=HEADLESS_ARGS)
        page = await browser.new_page(base_url=f"http://127.0.0.1:{bus.http_port}")
        audit = Audit(page, axe_source)
        try:
            await page.goto("/tell-us-once")
            await audit.check("informant start")
            await _tab_to(page, "a.govuk-button--start")
            await page.keyboard.press("Enter")
            await page.wait_for_url("**/tell-us-once/reference")
            await audit.check("reference and date of birth")

            await _answer(page, reference, "3", "3", "1941")
            await audit.check("reference and date of birth, with an error")
            summary = page.locator(".govuk-error-summary")
            assert "The reference or the date of birth is not right" in await summary.inner_text()
            # The summary takes the focus, and its link leads to the field.
            assert await page.evaluate("document.activeElement.closest('.govuk-error-summary') !== null")
            await _tab_to(page, ".govuk-error-summary a")
            await page.keyboard.press("Enter")
            assert await page.evaluate("document.activeElement.id") == "reference"

            await _answer(page, reference, "2", "3", "1941")
            assert page.url.endswith("/tell-us-once/registration")
            await audit.check("the registration")
            main = await page.locator("main").inner_text()
            assert f"Reference {reference}" in main and "Who has been told" in main

            # Asking the Passport Office to be told: a detail left out, then put right.
            await _tab_to(page, "a.govuk-button[href='/tell-us-once/services']")
            async with page.expect_navigation():
                await page.keyboard.press("Enter")
            await audit.check("which organisations to tell")
            await _tab_to(page, "#agencies-hmpo")
            await page.keyboard.press("Space")
            await _tab_to(page, "#permission")
            await page.keyboard.press("Space")
            await _tab_to(page, "form button.govuk-button")
            async with page.expect_navigation():
                await page.keyboard.press("Enter")
            await audit.check("which organisations to tell, with an error")
            summary = page.locator(".govuk-error-summary")
            assert "Enter the passport number" in await summary.inner_text()
            await _tab_to(page, ".govuk-error-summary a")
            await page.keyboard.press("Enter")
            assert await page.evaluate("document.activeElement.id") == "passport_number"
            await page.keyboard.type("123456789")
            async with page.expect_navigation():
                await page.keyboard.press("Enter")
            await audit.check("check your answers")
            assert "Passport number: 123456789" in await page.locator("main").inner_text()
            await _tab_to(page, "form[action='/tell-us-once/services/confirm'] button")
            async with page.expect_navigation():
                await page.keyboard.press("Enter")
            await audit.check("request sent")
            sent = await page.locator("main").inner_text()
            assert "Your request has been sent" in sent and "HM Passport Office" in sent

            await _tab_to(page, "form.tuo-sign-out button")
            async with page.expect_navigation():
                await page.keyboard.press("Enter")
            await audit.check("signed out")
            assert "You have signed out" in await page.locator("main").inner_text()
            await page.goto("/tell-us-once/registration")
            assert page.url.endswith("/tell-us-once/reference"), "signed out: back to the start"
        finally:
            await browser.close()
            print(
                f"\ninformant browser test: {time.monotonic() - started:.1f}s, "
                f"axe-core checked {len(audit.pages)} pages: {audit.pages}"
            )
