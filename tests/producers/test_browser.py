"""The registrars' forms in a real browser (Debian's Chromium, driven by Playwright):
sign in, make a mistake, follow the error summary to the field, correct it, send,
and read the reference number, checking every page with axe-core on the way.

No browser is downloaded: Playwright launches /usr/bin/chromium (scripts/setup.sh
installs it with apt). axe-core comes from npm (package.json). If either is
missing, the test fails and says how to get it.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from operators.services import RunningBus
from producers.accounts import add_registrar
from runtime.settings import Settings
from tests.producers.test_web_forms import OFFICE, PASSWORD, records_by, serve_web
from tests.support import random_nino, today

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"
HEADLESS_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-extensions"]
BLOCKING_IMPACTS = ("serious", "critical")
_REFERENCE = re.compile(r"^TUO-[0-9]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}$")

_RUN_AXE = """async () => {
  const results = await axe.run(document, {resultTypes: ["violations"]});
  return results.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(" "))
  }));
}"""


def _need(path: Path, how: str) -> Path:
    if not path.is_file():
        pytest.fail(f"{path} is missing: {how}")
    return path


@contextlib.asynccontextmanager
async def audited_browser() -> AsyncIterator[tuple[Browser, str]]:
    """Headless Chromium and axe-core's source, for a test that checks pages; either one
    missing fails the test (it never skips)."""
    chromium = _need(
        CHROMIUM, "install Debian's chromium (`bash scripts/setup.sh`, or apt-get install chromium)"
    )
    axe_source = _need(AXE, "run `npm ci` in the project (scripts/setup.sh does)").read_text()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=HEADLESS_ARGS)
        try:
            yield browser, axe_source
        finally:
            await browser.close()


@pytest.fixture(scope="module")
async def secure_web(services: Settings, pool: asyncpg.Pool, bus: RunningBus) -> AsyncIterator[str]:
    # The production default: Secure, __Host- cookies. Chromium treats http://127.0.0.1 as a
    # secure context, so this works over plain http here.
    assert services.session_cookie_secure
    async with serve_web(services, pool) as base_url:
        yield base_url


class Audit:
    """axe-core on every page visited; serious and critical violations fail the test."""

    def __init__(self, page: Page, source: str) -> None:
        self.page = page
        self.source = source
        self.pages: list[str] = []
        self.minor: list[dict[str, Any]] = []
        self.csp_violations: list[str] = []
        page.on(
            "console",
            lambda message: (
                self.csp_violations.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )

    async def check(self, name: str) -> None:
        # Evaluated through the DevTools protocol rather than added as a <script>, so the
        # pages' own content security policy stays on (and is checked as well).
        await self.page.evaluate(self.source)
        violations: list[dict[str, Any]] = await self.page.evaluate(_RUN_AXE)
        blocking = [v for v in violations if v["impact"] in BLOCKING_IMPACTS]
        assert not blocking, f"accessibility violations on the {name} page: {blocking}"
        self.minor += [{"page": name, **v} for v in violations]
        self.pages.append(name)
        assert not self.csp_violations, f"content security policy violations: {self.csp_violations}"


async def test_a_registrar_signs_in_corrects_a_mistake_and_gets_a_reference_on_accessible_pages(
    secure_web: str, pool: asyncpg.Pool
) -> None:
    # Checked here, in the test, so that a missing browser or checker fails it (never skips it).
    chromium = _need(
        CHROMIUM, "install Debian's chromium (`bash scripts/setup.sh`, or apt-get install chromium)"
    )
    axe_source = _need(AXE, "run `npm ci` in the project (scripts/setup.sh does)").read_text()
    started = time.monotonic()
    username = f"browser-{uuid.uuid4().hex[:10]}"
    await add_registrar(pool, username, "Ada Registrar", OFFICE, "registrar", PASSWORD)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=HEADLESS_ARGS)
        page = await browser.new_page(base_url=secure_web)
        audit = Audit(page, axe_source)
        try:
            await _death_registration_journey(page, audit, secure_web, pool, username)
        finally:
            await browser.close()
            elapsed = time.monotonic() - started
            print(f"\nbrowser test: {elapsed:.1f}s, axe-core checked {len(audit.pages)} pages: {audit.pages}")
            for violation in audit.minor:
                where = f"{violation['impact']}) on {violation['page']}"
                print(f"  axe ({where}: {violation['id']}: {violation['help']} {violation['nodes']}")


async def _death_registration_journey(
    page: Page, audit: Audit, base_url: str, pool: asyncpg.Pool, username: str
) -> None:
    """Sign in, make a mistake, follow the error summary, correct it, send, read the reference."""
    await page.goto("/start")  # not signed in: sent to sign in, and back here after
    assert page.url.startswith(f"{base_url}/sign-in?next=")
    await audit.check("sign-in")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/start")
    await audit.check("start")
    # The template's inline line ran (allowed by its nonce), so GOV.UK Frontend's scripts start.
    assert await page.evaluate("document.body.classList.contains('govuk-frontend-supported')")

    await page.get_by_label("Register a death").check()
    await page.get_by_role("button", name="Continue").click()
    await page.wait_for_url("**/register/death")
    await audit.check("death registration form")

    died = today() - timedelta(days=4)
    form = page.locator("#deceased-given-names").locator("xpath=ancestor::form")
    await page.locator("#deceased-given-names").fill("Pat")
    await page.locator("#deceased-family-name").fill("Example")
    await page.locator("#deceased-date-of-birth-day").fill("2")
    await page.locator("#deceased-date-of-birth-month").fill("3")
    await page.locator("#deceased-date-of-birth-year").fill("1941")
    await page.locator("#deceased-nino").fill("AB 12 34")  # the mistake: too short
    await page.locator("#date-of-death-day").fill(str(died.day))
    await page.locator("#date-of-death-month").fill(str(died.month))
    await page.locator("#date-of-death-year").fill(str(died.year))
    await page.locator("#place-of-death").fill("Leeds General Infirmary")
    await page.locator("#last-address-lines-0").fill("1 Example Street")
    await page.locator("#last-address-town").fill("Leeds")
    await page.locator("#last-address-postcode").fill("LS1 1AA")
    await page.locator("#informant-name").fill("Alex Example")
    await page.locator("#informant-relationship").fill("daughter")
    assert await form.get_attribute("autocomplete") == "off"  # other people's details, shared desks
    await page.get_by_role("button", name="Continue").click()

    summary = page.locator(".govuk-error-summary")
    await summary.wait_for()
    assert (await page.title()).startswith("Error: Register a death")
    # GOV.UK Frontend moves focus to the summary, so a screen reader announces it.
    assert await page.evaluate("document.activeElement.classList.contains('govuk-error-summary')")
    await audit.check("death registration form with an error")
    link = summary.get_by_role("link", name=re.compile("National Insurance number"))
    assert await link.get_attribute("href") == "#deceased-nino"
    await link.click()
    assert await page.evaluate("document.activeElement.id") == "deceased-nino"
    inline = page.locator("#deceased-nino-error")
    assert "in the correct format" in await inline.inner_text()
    nino = random_nino()
    await page.locator("#deceased-nino").fill(nino)
    assert await records_by(pool, username) == 0  # the mistake wrote nothing
    await page.get_by_role("button", name="Continue").click()

    await page.wait_for_url("**/register/death/organisations")
    await audit.check("organisations")
    assert "Registration Service Act 1953" in await page.inner_text("main")
    await page.locator("#consent-dvla").check()  # yes
    await page.locator("#consent-hmpo-2").check()  # no
    await page.get_by_role("button", name="Continue").click()

    await page.wait_for_url("**/register/death/check")
    await audit.check("check your answers")
    assert nino in await page.inner_text("main")
    await page.get_by_role("button", name="Accept and send").click()

    await page.wait_for_url("**/registrations/*")
    await audit.check("confirmation")
    reference = (await page.locator("[data-reference]").inner_text()).strip()
    assert _REFERENCE.match(reference), reference
    assert page.url.endswith(f"/registrations/{reference}")
    assert await records_by(pool, username) == 1
    # Without reloading, the page fills in each organisation's status as receipts arrive.
    await page.locator('[data-agency-status][data-settled="true"]').wait_for(timeout=60_000)
    assert "HM Revenue and Customs" in await page.locator("table").inner_text()
    assert await page.locator("[data-refresh-link]").count() == 0
    assert "Every organisation has answered" in await page.locator("[data-announcer]").inner_text()
    await audit.check("confirmation, every organisation answered")

    await page.goto("/register/birth")
    await audit.check("birth registration form")
    await page.get_by_role("button", name="Continue").click()
    await page.locator(".govuk-error-summary").wait_for()
    await audit.check("birth registration form with errors")
    await page.goto("/register/address")
    await audit.check("change of address form")
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/sign-in?reason=signed-out")
    await audit.check("signed out")
    await page.goto("/no-such-page")
    await audit.check("page not found")


async def test_the_api_documentation_renders_with_nothing_from_any_other_origin(
    services: Settings, pool: asyncpg.Pool
) -> None:
    chromium = _need(
        CHROMIUM, "install Debian's chromium (`bash scripts/setup.sh`, or apt-get install chromium)"
    )
    async with serve_web(services, pool) as base_url, async_playwright() as playwright:
        origin = urlsplit(base_url)
        attempted: list[str] = []  # every request the page tried to make anywhere else
        csp_violations: list[str] = []

        async def this_server_only(route: Route) -> None:
            url = urlsplit(route.request.url)
            if (url.scheme, url.netloc) == (origin.scheme, origin.netloc):
                await route.continue_()
            else:
                attempted.append(route.request.url)
                await route.abort("blockedbyclient")

        browser = await playwright.chromium.launch(executable_path=str(chromium), args=HEADLESS_ARGS)
        try:
            context = await browser.new_context(base_url=base_url)
            await context.route("**/*", this_server_only)  # every page and worker of the context
            page = await context.new_page()
            page.on(
                "console",
                lambda message: (
                    csp_violations.append(message.text) if "Content Security Policy" in message.text else None
                ),
            )
            response = await page.goto("/docs")
            assert response is not None and response.status == 200
            operation = page.locator(".opblock-post", has_text="/v1/death-registrations")
            await operation.first.wait_for(state="visible", timeout=30_000)
            assert "POST" in await operation.first.locator(".opblock-summary-method").inner_text()
            await operation.first.locator(".opblock-summary-control").click()  # expand it: it works
            await page.get_by_role("button", name="Try it out").first.wait_for(state="visible")
            policy = await response.header_value("content-security-policy")
            title = await page.title()
        finally:
            await browser.close()

    assert attempted == [], f"the documentation tried to reach other origins: {attempted}"
    assert not csp_violations, f"content security policy violations: {csp_violations}"
    assert policy is not None
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    # This origin alone (and data: images, which Swagger UI's stylesheet draws its icons with).
    assert re.fullmatch(r"'self' 'nonce-[A-Za-z0-9_-]+'", directives.pop("script-src"))
    assert directives == {
        "default-src": "'none'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "frame-ancestors": "'none'",
        "base-uri": "'none'",
        "form-action": "'none'",
    }
    assert "unsafe-inline" not in policy and "http" not in policy
    assert title == "Tell Us Once intake API"
