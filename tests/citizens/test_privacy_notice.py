"""The privacy notice every consent receipt points to (``policyUrl``): served by the
running service to anyone, saying who controls the data, what is done with it, on
which lawful basis each organisation is told (read from the subscriptions in force),
how long records are kept, the person's rights and how to withdraw consent — on an
accessible page (axe-core in Chromium)."""

from __future__ import annotations

import html
import re

import asyncpg
import httpx
import pytest

from citizens.privacy import RETENTION
from operators.services import RunningBus
from tests.producers.test_browser import Audit, audited_browser

pytestmark = pytest.mark.integration


def _text(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


async def test_the_privacy_notice_says_who_controls_the_data_why_each_body_is_told_and_how_to_withdraw(
    bus: RunningBus, pool: asyncpg.Pool
) -> None:
    # Nobody signed in: the notice is for anyone, before they use the service.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as anyone:
        notice = await anyone.get("/privacy")
        refused = await anyone.post("/privacy", data={"anything": "x" * 10_000})
        with_junk = await anyone.get("/privacy?for=../../etc&%00=%27")

    assert notice.status_code == 200
    assert notice.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" in notice.headers["content-security-policy"]
    text = _text(notice.text)
    assert '<html lang="en"' in notice.text and "<title>Privacy notice – " in notice.text
    assert notice.text.count("<h1") == 1
    # Who is responsible, and how to reach them.
    assert "Tell Us Once is the data controller" in text
    assert "mailto:data-protection@tell-us-once.example" in notice.text
    # Both lawful bases, with the organisations and statutes as the subscriptions say.
    assert "UK GDPR Article 6(1)(c) and (e)" in text and "UK GDPR Article 6(1)(a)" in text
    statutory = await pool.fetch(
        "SELECT DISTINCT statute FROM subscription WHERE legal_basis = 'statutory' AND status = 'active'"
    )
    assert statutory
    for row in statutory:
        assert row["statute"] in text
    start = text.index("Sharing only with your consent")
    consent_part = text[start : text.index("How long we keep each kind of record", start)]
    assert "Driver and Vehicle Licensing Agency" in consent_part and "HM Passport Office" in consent_part
    assert "Social Security Administration Act 1992" not in consent_part
    # Retention, rights, withdrawal, receipts, complaints.
    for record, period in RETENTION:
        assert record in text and period in text
    assert "withdraw your consent at any time" in text
    assert 'href="/citizen/consents"' in notice.text and "Choose ‘No’" in text
    assert 'href="/.well-known/consent-receipts/jwks.json"' in notice.text
    assert "Information Commissioner's Office" in text
    # Every entry in the contents leads to a section of the page.
    for anchor in re.findall(r'href="#([a-z-]+)"', notice.text):
        assert f'id="{anchor}"' in notice.text, anchor

    assert refused.status_code == 405
    assert with_junk.status_code == 200 and with_junk.text.count("<h1") == 1


async def test_the_privacy_notice_is_accessible(bus: RunningBus) -> None:
    async with audited_browser() as (browser, axe_source):
        page = await browser.new_page(base_url=f"http://127.0.0.1:{bus.http_port}")
        audit = Audit(page, axe_source)
        await page.goto("/privacy")
        await audit.check("privacy notice")
        assert await page.get_by_role("heading", level=1).inner_text() == "Privacy notice"
        await page.get_by_role("link", name="How to withdraw your consent").click()
        assert page.url.endswith("#withdraw")
