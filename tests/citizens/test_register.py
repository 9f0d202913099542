"""The public register of sharing agreements (issue 25): a page and open data (JSON, CSV)
for anyone, read from the subscriptions the router decides on and their versions, so a
change shows at once and the old terms stay listed; no personal data; accessible."""

from __future__ import annotations

import csv
import io
import uuid

import asyncpg
import httpx
import pytest

from citizens.register import CSV_COLUMNS, LICENCE, register_csv
from operators.services import RunningBus
from router.store import upsert_subscription
from runtime.access import onboard_agency
from runtime.settings import Settings
from tests.producers.test_browser import Audit, audited_browser

pytestmark = pytest.mark.integration


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def test_a_change_to_a_subscription_shows_at_once_with_the_old_version_still_listed(
    services: Settings, bus: RunningBus, pool: asyncpg.Pool
) -> None:
    agency = f"reg-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")

    async def terms(fields: list[str], statute: str, reason: str) -> int:
        return await upsert_subscription(
            pool,
            agency=agency,
            event_type="DeathRegistered",
            legal_basis="statutory",
            statute=statute,
            fields=fields,
            condition=None,
            by="alice.operator",
            reason=reason,
        )

    try:
        first = await terms(["date_of_death"], "Register Test Act 2026 s.1", "the first agreement")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as anyone:
            before = _rows((await anyone.get("/register.csv")).text)
            mine = [r for r in before if r["agency"] == agency]
            assert [(r["version"], r["in_force_now"], r["fields"]) for r in mine][-1] == (
                str(first),
                "yes",
                "date_of_death",
            )
            second = await terms(
                ["date_of_death", "deceased"], "Register Test Act 2027 s.9", "=cmd|' /C calc'!A0"
            )
            page = await anyone.get("/register")
            data = await anyone.get("/register.json")
            table = await anyone.get("/register.csv")
        # The page: the new terms in force, the old ones among the earlier versions.
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        section = page.text[page.text.index(f'id="{agency}-DeathRegistered"') :]
        section = section[: section.find("<h3", 10) if "<h3" in section[10:] else len(section)]
        assert "Register Test Act 2027 s.9" in section and "Register Test Act 2026 s.1" in section
        assert "Earlier versions (2)" in section  # the onboarding skeleton and the first agreement
        assert "About everyone" in section and "date of death" in section
        # Open data: the same, with the licence.
        assert data.status_code == 200 and data.json()["licence"] == LICENCE
        [agreement] = [a for a in data.json()["agreements"] if a["agency"] == agency]
        assert agreement["version"] == second and agreement["statute"] == "Register Test Act 2027 s.9"
        assert [v["version"] for v in agreement["versions"]][-2:] == [first, second]
        assert agreement["versions"][-2]["in_force_to"] == agreement["versions"][-1]["in_force_from"]
        assert table.headers["content-type"] == "text/csv; charset=utf-8"
        assert 'rel="license"' in table.headers["link"]
        rows = [r for r in _rows(table.text) if r["agency"] == agency]
        assert list(rows[0]) == list(CSV_COLUMNS)
        assert [(r["version"], r["in_force_now"]) for r in rows][-2:] == [
            (str(first), "no"),
            (str(second), "yes"),
        ]
        assert rows[-1]["fields"] == "date_of_death deceased" and rows[-2]["fields"] == "date_of_death"
        # A reason is free text: no spreadsheet runs it as a formula.
        assert rows[-1]["reason"] == "'=cmd|' /C calc'!A0"
        # No personal data: an operator is a role, never a name.
        for body in (page.text, data.text, table.text):
            assert "alice.operator" not in body
        assert rows[-1]["changed_by"] == "an operator"
    finally:
        await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", agency)


def test_the_csv_has_a_row_per_version_and_nothing_when_there_is_nothing() -> None:
    assert _rows(register_csv([])) == []
    assert register_csv([]).splitlines() == [",".join(CSV_COLUMNS)]


async def test_the_register_is_accessible_and_refuses_what_is_not_a_read(
    services: Settings, bus: RunningBus, pool: asyncpg.Pool
) -> None:
    # An agreement with an earlier version, whichever tests ran before this one.
    agency = f"reg-{uuid.uuid4().hex[:8]}"
    await onboard_agency(services, pool, agency, ["DeathRegistered"], by="tests")
    await upsert_subscription(
        pool,
        agency=agency,
        event_type="DeathRegistered",
        legal_basis="statutory",
        statute="Register Test Act 2026 s.2",
        fields=["date_of_death"],
        condition=None,
        by="tests",
        reason="an agreement with a history",
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as anyone:
        assert (await anyone.post("/register", data={"x": "y" * 10_000})).status_code == 405
        assert (await anyone.delete("/register.csv")).status_code == 405
        junk = await anyone.get("/register.json?agency=../../etc&%00=%27")
        assert junk.status_code == 200 and junk.json()["agreements"]
    try:
        async with audited_browser() as (browser, axe_source):
            page = await browser.new_page(base_url=f"http://127.0.0.1:{bus.http_port}")
            audit = Audit(page, axe_source)
            await page.goto("/register")
            await audit.check("register of sharing agreements")
            assert await page.get_by_role("heading", level=1).inner_text() == "Register of sharing agreements"
            await page.get_by_text("Earlier versions").first.click()
            await audit.check("register with a version history open")
    finally:
        await pool.execute("UPDATE subscription SET status = 'suspended' WHERE agency = $1", agency)
