"""The public performance dashboard: every chart drawn from a seeded run, each with its
data table, no count under 10 published (nor one that subtraction would reveal), readable
without JavaScript and checked with axe-core."""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from citizens import performance
from citizens.performance import (
    HIDDEN,
    Bar,
    bar_chart,
    figures,
    first_week,
    suppress,
)
from operators.services import RunningBus
from runtime.settings import Settings
from tests.producers.test_browser import Audit, audited_browser
from tests.support import death_registration, eventually, tuo_cli

SVG = "{http://www.w3.org/2000/svg}"


def test_counts_from_1_to_9_are_hidden_and_so_is_one_that_would_reveal_them() -> None:
    assert suppress([0, 3, 10, 250]) == [0, None, 10, 250]  # zero describes no one
    # With their total published, one hidden count could be worked out: the next smallest goes too.
    assert suppress([0, 3, 10, 250], with_total=True) == [0, None, None, 250]
    assert suppress([4, 5, 100], with_total=True) == [None, None, 100]  # two hidden: no sum gives one
    assert suppress([7, 0], with_total=True) == [None, 0]  # the total, 7, is hidden itself
    assert suppress([]) == []


def _agencies(delivered: int, due: int, within: int, receipted: int) -> performance.AgencyFigures:
    row = {
        "agency": "hmrc",
        "delivered": delivered,
        "due": due,
        "within": within,
        "receipted": receipted,
        "median_seconds": 42.0,
    }
    [found] = performance._agencies([row], {"hmrc": 3})
    return found


def test_an_organisations_row_hides_what_subtraction_would_reveal() -> None:
    whole = _agencies(delivered=200, due=150, within=120, receipted=130)
    assert (whole.delivered, whole.due, whole.within_deadline) == (200, 150, 120)
    assert whole.share_within == pytest.approx(0.8) and whole.median_seconds == 42.0
    assert whole.overdue_now is None  # 3 overdue: fewer than 10
    late = _agencies(delivered=200, due=150, within=145, receipted=150)  # 5 late
    assert late.within_deadline is None and late.share_within is None and late.due == 150
    recent = _agencies(delivered=152, due=150, within=120, receipted=130)  # 2 not yet due
    assert recent.due is None and recent.within_deadline is None and recent.share_within is None
    few = _agencies(delivered=12, due=12, within=12, receipted=9)
    assert few.median_seconds is None  # a median of 9 receipts is not published


def test_a_chart_labels_every_bar_in_text_and_draws_none_for_a_hidden_figure() -> None:
    svg = bar_chart(
        "c1",
        "Deaths <registered>",
        [Bar("Week of 1 Dec", 40, "40"), Bar("<script>alert(1)</script>", None, HIDDEN)],
    )
    root = ET.fromstring(str(svg))  # noqa: S314 - the chart this test just drew
    assert root.get("role") == "img" and root.get("aria-labelledby") == "c1-title c1-desc"
    assert root.findtext(f"{SVG}title") == "Deaths <registered>"
    assert "largest is Week of 1 Dec, 40" in (root.findtext(f"{SVG}desc") or "")
    assert "1 not published" in (root.findtext(f"{SVG}desc") or "")
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts == ["Week of 1 Dec", "40", "<script>alert(1)</script>", HIDDEN]
    assert len(list(root.iter(f"{SVG}rect"))) == 1  # no bar for the hidden figure
    assert "<script>" not in str(svg)
    nothing = ET.fromstring(str(bar_chart("c2", "None", [Bar("a", None, HIDDEN)])))  # noqa: S314
    assert "none is published" in (nothing.findtext(f"{SVG}desc") or "")


def test_weeks_begin_on_monday_in_the_uk_across_the_change_of_clocks() -> None:
    # Tuesday 3 November 2026 (GMT); eight weeks back is Monday 14 September (BST).
    since = first_week(datetime(2026, 11, 3, 10, 0, tzinfo=UTC))
    assert since.astimezone(UTC) == datetime(2026, 9, 13, 23, 0, tzinfo=UTC)
    assert performance._weeks(since, datetime(2026, 11, 3, 10, 0, tzinfo=UTC))[-1].isoformat() == "2026-11-02"


@pytest.mark.integration
async def test_the_dashboard_draws_every_chart_from_a_seeded_run_and_hides_small_numbers(
    services: Settings,
    pool: asyncpg.Pool,
    intake: httpx.AsyncClient,
    bus: RunningBus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = datetime.now(UTC)
    references, event_ids = [], []
    for channel in ["desk"] * 12 + ["phone"] * 3:
        answer = await intake.post("/v1/death-registrations", json=death_registration(channel=channel))
        assert answer.status_code == 201, answer.text
        references.append(answer.json()["reference"])
        event_ids.append(uuid.UUID(answer.json()["event_id"]))

    async def receipted() -> bool:
        count = await pool.fetchval(
            "SELECT count(DISTINCT event_id) FROM delivery_receipt"
            " WHERE agency = 'hmrc' AND event_id = ANY($1::uuid[]) AND outcome IN ('APPLIED', 'REJECTED')",
            event_ids,
        )
        return bool(count == len(event_ids))

    await eventually(receipted, timeout=90, what="HMRC's receipts for the 15 deaths")
    code, out = await asyncio.to_thread(
        tuo_cli,
        services,
        "receipts",
        "redeliver",
        "hmrc",
        "--reason",
        "the dashboard test redelivers twelve",
        *[a for r in references[:12] for a in ("--reference", r)],
    )
    assert code == 0 and "Queued 12" in out, out

    # Only this test writes to the session's stack while it runs: the window holds its events.
    found = await figures(
        pool, timedelta(minutes=services.receipt_deadline_minutes), since=started, until=datetime.now(UTC)
    )
    [deaths] = [w for w in found.events if w.event_type == "DeathRegistered"]
    # 3 by phone is hidden; with the total published, 12 at the desk would reveal it, so it goes too.
    assert deaths.total == 15
    assert deaths.by_channel == {"desk": None, "phone": None, "online": 0, "system": 0, "not recorded": 0}
    [hmrc] = [a for a in found.agencies if a.agency == "hmrc"]
    assert hmrc.delivered is not None and hmrc.delivered >= 15
    assert hmrc.within_deadline is not None and hmrc.share_within == pytest.approx(1.0)
    assert hmrc.median_seconds is not None and 0 < hmrc.median_seconds < 90
    delivered = next(o for o in found.outcomes if o.outcome == "DELIVERED")
    assert delivered.count is not None and delivered.share is not None and 0 < delivered.share <= 1
    assert [(r.redeliveries, r.replays) for r in found.repairs] == [(12, 0)]

    # The page: every chart, each followed by its table, accessible, with small numbers hidden.
    monkeypatch.setattr(performance, "CACHE_SECONDS", 0.0)  # this test's figures, not a minute-old copy
    base_url = f"http://127.0.0.1:{bus.http_port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as anyone:
        page = await anyone.get("/performance")
        assert page.status_code == 200 and page.headers["cache-control"] == "public, max-age=0"
        assert (await anyone.post("/performance", data={"x": "y" * 10_000})).status_code == 405
        opened = (await anyone.get("/performance.json?week=../../etc&%00=%27")).json()
    assert opened["licence"]["name"] == "Open Government Licence v3.0"
    assert all(
        cell is None or cell == 0 or cell >= 10
        for week in opened["events_registered"]
        for cell in [*week["by_channel"].values(), week["total"]]
    )
    async with audited_browser() as (browser, axe_source):
        context = await browser.new_context(base_url=base_url, java_script_enabled=False)
        tab = await context.new_page()
        await tab.goto("/performance")
        titles = [await t.text_content() for t in await tab.locator("svg > title").all()]
        for chart in (
            "Death registrations, by week beginning",
            "Share of routing decisions by outcome",
            "Share of due deliveries receipted within the deadline, by organisation",
            "Median time from delivery to the organisation's receipt",
            "Deliveries without a receipt past their deadline now, by organisation",
            "Events sent again by replays, and redeliveries, by week beginning",
        ):
            assert chart in titles, titles
        captions = await tab.locator("table caption").all_inner_texts()
        assert len(captions) == 4, captions
        assert await tab.get_by_role("cell", name=HIDDEN).count() > 0
        await context.close()
        tab = await browser.new_page(base_url=base_url)
        await tab.goto("/performance")
        await Audit(tab, axe_source).check("performance dashboard")


def test_times_read_as_a_person_would_say_them() -> None:
    assert [performance.duration_text(s) for s in (0.32, 42, 600, 7200, 3 * 86400, None)] == [
        "0.3 seconds",
        "42 seconds",
        "10 minutes",
        "2.0 hours",
        "3.0 days",
        "not published",
    ]
