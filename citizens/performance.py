"""The public performance dashboard: ``GET /performance`` (charts, each with the data
table behind it) and ``GET /performance.json`` (the same figures as open data, under the
Open Government Licence). It answers, for the last eight weeks:

- how many events were registered each week, by type and by channel;
- what share of routing decisions delivered, and what was withheld and why;
- per organisation: the share of deliveries receipted within its deadline, the median
  time to a receipt, and how many deliveries are overdue now;
- how often operators replayed or redelivered events.

Every figure is a PostgreSQL aggregate. None identifies anyone: a count from 1 to 9 is
published as "fewer than 10", and so is any count from which a hidden one could be worked
out by subtraction (secondary suppression); a share or a median is published only when
the counts behind it are. Zero is published: it describes no one.

The figures are read at most once a minute (``CACHE_SECONDS``), whoever asks, so the public
page cannot be used to load the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from markupsafe import Markup
from starlette.responses import Response

from citizens.data_tracker import event_name
from citizens.pages import render
from citizens.register import LICENCE, public
from router.organisations import agency_name
from router.tracker import FINAL_OUTCOMES

LONDON = ZoneInfo("Europe/London")
WEEKS = 8
SMALLEST_SHOWN = 10  # no published count is from 1 to 9
CACHE_SECONDS = 60.0
PATHS = {"html": "/performance", "json": "/performance.json"}
CHANNELS = {"desk": "At a desk", "phone": "By phone", "online": "Online", "system": "By system"}
UNRECORDED = "not recorded"  # events stored before intake kept the channel (migration 0037)
OUTCOME_WORDS = {
    "DELIVERED": "Delivered",
    "WITHHELD_NO_CONSENT": "Withheld: no consent",
    "WITHHELD_NO_SUBSCRIPTION": "Withheld: no agreement in force",
    "WITHHELD_NOT_OF_INTEREST": "Withheld: not a person it registered",
    "WITHHELD_AREA_UNKNOWN": "Withheld: local authority not known",
    "BLOCKED": "Withheld: blocked by an operator",
}
HIDDEN = "fewer than 10"


# --- Small-number suppression (pure) ---------------------------------------------------


def suppress(counts: Sequence[int], *, with_total: bool = False) -> list[int | None]:
    """``counts`` as they may be published: None where hidden. A count from 1 to 9 is
    hidden. When their total is published beside them and only one is hidden, the smallest
    other count above zero is hidden too, so that the hidden one cannot be worked out."""
    shown: list[int | None] = [None if 0 < c < SMALLEST_SHOWN else c for c in counts]
    hidden = [i for i, c in enumerate(shown) if c is None]
    if with_total and len(hidden) == 1:
        others = sorted((c, i) for i, c in enumerate(counts) if shown[i] is not None and c > 0)
        if others:
            shown[others[0][1]] = None
    return shown


def hide_small(count: int) -> int | None:
    return suppress([count])[0]


def share(part: int | None, whole: int | None) -> float | None:
    """A share, only when both counts behind it are published."""
    if part is None or whole is None or whole == 0:
        return None
    return part / whole


def count_text(count: int | None) -> str:
    return HIDDEN if count is None else f"{count:,}"


def share_text(fraction: float | None) -> str:
    return "not published" if fraction is None else f"{fraction:.0%}"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "not published"
    if seconds < 10:
        return f"{seconds:.1f} seconds"
    if seconds < 90:
        return f"{seconds:.0f} seconds"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


# --- Charts (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None  # None: not published (no bar is drawn)
    text: str  # the value as a reader reads it


WIDTH, LABEL_WIDTH, BAR_SPACE, ROW, PAD = 720, 300, 300, 30, 6
INK, BLUE = "#0b0c0c", "#1d70b8"  # GOV.UK text and brand blue: both 4.5:1 or more on white


def bar_chart(chart_id: str, title: str, bars: Sequence[Bar], *, scale_to: float | None = None) -> Markup:
    """A horizontal bar chart as SVG, drawn on the server: every bar carries its label and
    its value in text, so nothing is told by colour alone, and screen readers get the
    title and a one-sentence summary (the table after the chart gives every figure)."""
    most = scale_to or max((b.value for b in bars if b.value is not None), default=0.0) or 1.0
    height = 2 * PAD + ROW * len(bars)
    published = [b for b in bars if b.value is not None]
    if published:
        top = max(published, key=lambda b: b.value or 0.0)
        summary = (
            f"{len(bars)} bars; the largest is {top.label}, {top.text}."
            + (
                f" {len(bars) - len(published)} not published (fewer than 10)."
                if len(published) < len(bars)
                else ""
            )
            + " The table below gives every figure."
        )
    else:
        summary = "Every figure is fewer than 10, so none is published."
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%"'
        f' role="img" aria-labelledby="{chart_id}-title {chart_id}-desc" focusable="false">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(summary)}</desc>',
    ]
    for i, bar in enumerate(bars):
        middle = PAD + i * ROW + ROW / 2
        label = bar.label if len(bar.label) <= 36 else bar.label[:35] + "…"
        parts.append(
            f'<text x="{LABEL_WIDTH - 10}" y="{middle:.0f}" text-anchor="end" dominant-baseline="middle"'
            f' font-family="Arial, sans-serif" font-size="15" fill="{INK}">{escape(label)}</text>'
        )
        length = 0.0 if bar.value is None else max(0.0, BAR_SPACE * bar.value / most)
        if length > 0:
            parts.append(
                f'<rect x="{LABEL_WIDTH}" y="{middle - ROW / 2 + 5:.0f}" width="{length:.1f}"'
                f' height="{ROW - 10}" fill="{BLUE}"/>'
            )
        parts.append(
            f'<text x="{LABEL_WIDTH + length + 8:.1f}" y="{middle:.0f}" dominant-baseline="middle"'
            f' font-family="Arial, sans-serif" font-size="15" fill="{INK}">{escape(bar.text)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it is escaped above


# --- The figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class WeekOfEvents:
    week: date
    event_type: str
    by_channel: dict[str, int | None]  # channel (or UNRECORDED) → published count
    total: int | None


@dataclass(frozen=True)
class OutcomeShare:
    outcome: str
    count: int | None
    share: float | None


@dataclass(frozen=True)
class AgencyFigures:
    agency: str
    delivered: int | None
    due: int | None  # receipted, or past their deadline
    within_deadline: int | None
    share_within: float | None
    median_seconds: float | None
    overdue_now: int | None


@dataclass(frozen=True)
class WeekOfRepairs:
    week: date
    replays: int | None
    replayed_events: int | None
    redeliveries: int | None
    republished: int | None


@dataclass(frozen=True)
class Figures:
    since: datetime
    until: datetime
    weeks: list[date]
    events: list[WeekOfEvents]
    channels: list[str]
    outcomes: list[OutcomeShare]
    decisions: int | None
    agencies: list[AgencyFigures]
    repairs: list[WeekOfRepairs]
    read_at: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "suppression": f"counts from 1 to {SMALLEST_SHOWN - 1}, and counts from which one could be"
            " worked out, are null",
            "events_registered": [
                {
                    "week_beginning": w.week.isoformat(),
                    "event_type": w.event_type,
                    "by_channel": w.by_channel,
                    "total": w.total,
                }
                for w in self.events
            ],
            "routing_decisions": {
                "total": self.decisions,
                "by_outcome": [
                    {"outcome": o.outcome, "count": o.count, "share": o.share} for o in self.outcomes
                ],
            },
            "receipts_by_organisation": [
                {
                    "agency": a.agency,
                    "organisation": agency_name(a.agency),
                    "delivered": a.delivered,
                    "due": a.due,
                    "receipted_within_deadline": a.within_deadline,
                    "share_within_deadline": a.share_within,
                    "median_seconds_to_receipt": a.median_seconds,
                    "overdue_now": a.overdue_now,
                }
                for a in self.agencies
            ],
            "replays_and_redeliveries": [
                {
                    "week_beginning": r.week.isoformat(),
                    "replays": r.replays,
                    "events_sent_by_replays": r.replayed_events,
                    "redeliveries": r.redeliveries,
                    "dead_letters_republished": r.republished,
                }
                for r in self.repairs
            ],
        }


def first_week(now: datetime, weeks: int = WEEKS) -> datetime:
    """Monday 00:00 in the UK, ``weeks - 1`` weeks before this week's."""
    local = now.astimezone(LONDON)
    monday = local.date() - timedelta(days=local.weekday() + 7 * (weeks - 1))
    return datetime(monday.year, monday.month, monday.day, tzinfo=LONDON)


async def figures(
    pool: asyncpg.Pool, default_deadline: timedelta, *, since: datetime, until: datetime
) -> Figures:
    """Every figure for events recorded (and decisions made) from ``since`` to ``until``,
    read in one snapshot of the database and suppressed before it leaves this function."""
    week = "(date_trunc('week', {} AT TIME ZONE 'Europe/London'))::date"
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        events = await conn.fetch(
            f"SELECT {week.format('recorded_at')} AS week, event_type, coalesce(channel, $3) AS channel,"
            "        count(*)::int AS n"
            "  FROM intake_record WHERE recorded_at >= $1 AND recorded_at < $2 GROUP BY 1, 2, 3",
            since,
            until,
            UNRECORDED,
        )
        outcomes = await conn.fetch(
            "SELECT outcome, count(*)::int AS n FROM routing_decision"
            " WHERE decided_at >= $1 AND decided_at < $2 GROUP BY outcome",
            since,
            until,
        )
        receipts = await conn.fetch(
            "WITH delivered AS ("
            "  SELECT d.agency, d.decided_at, coalesce(l.deadline, $3::interval) AS deadline,"
            "         (SELECT min(r.stored_at) FROM delivery_receipt r"
            "           WHERE r.event_id = d.event_id AND r.agency = d.agency"
            "             AND r.outcome = ANY($4::text[])) AS receipted_at"
            "    FROM routing_decision d LEFT JOIN agency_receipt_deadline l USING (agency)"
            "   WHERE d.outcome = 'DELIVERED' AND d.decided_at >= $1 AND d.decided_at < $2)"
            " SELECT agency, count(*)::int AS delivered,"
            "        count(*) FILTER (WHERE receipted_at IS NOT NULL"
            "                          OR decided_at + deadline <= $2)::int AS due,"
            "        count(*) FILTER (WHERE receipted_at <= decided_at + deadline)::int AS within,"
            "        count(receipted_at)::int AS receipted,"
            "        percentile_cont(0.5) WITHIN GROUP"
            "          (ORDER BY extract(epoch FROM receipted_at - decided_at)) AS median_seconds"
            "   FROM delivered GROUP BY agency",
            since,
            until,
            default_deadline,
            list(FINAL_OUTCOMES),
        )
        overdue = await conn.fetch(
            "SELECT agency, count(*)::int AS n FROM receipt_overdue"
            " WHERE receipted_at IS NULL GROUP BY agency"
        )
        repairs = await conn.fetch(
            "SELECT week, sum(replays)::int AS replays, sum(sent)::int AS sent,"
            "       sum(redeliveries)::int AS redeliveries, sum(republished)::int AS republished FROM ("
            f"  SELECT {week.format('started_at')} AS week, count(*) AS replays, sum(sent) AS sent,"
            "          0 AS redeliveries, 0 AS republished"
            "    FROM replay WHERE NOT dry_run AND started_at >= $1 AND started_at < $2 GROUP BY 1"
            f"  UNION ALL SELECT {week.format('requested_at')}, 0, 0, count(*), 0"
            "    FROM redelivery WHERE requested_at >= $1 AND requested_at < $2 GROUP BY 1"
            f"  UNION ALL SELECT {week.format('requested_at')}, 0, 0, 0, count(*)"
            "    FROM dead_letter_redrive WHERE action = 'republished'"
            "     AND requested_at >= $1 AND requested_at < $2 GROUP BY 1"
            ") AS each GROUP BY week",
            since,
            until,
        )
    weeks = _weeks(since, until)
    return Figures(
        since=since,
        until=until,
        weeks=weeks,
        events=_events(events),
        channels=[*CHANNELS, UNRECORDED],
        outcomes=_outcomes(outcomes),
        decisions=hide_small(sum(r["n"] for r in outcomes)),
        agencies=_agencies(receipts, {r["agency"]: r["n"] for r in overdue}),
        repairs=[
            WeekOfRepairs(
                r["week"],
                hide_small(r["replays"]),
                hide_small(r["sent"]),
                hide_small(r["redeliveries"]),
                hide_small(r["republished"]),
            )
            for r in sorted(repairs, key=lambda r: r["week"])
        ],
    )


def _weeks(since: datetime, until: datetime) -> list[date]:
    first = since.astimezone(LONDON).date()
    last = (until - timedelta(microseconds=1)).astimezone(LONDON).date()
    return [first + timedelta(days=7 * i) for i in range((last - first).days // 7 + 1)]


def _events(rows: Sequence[asyncpg.Record]) -> list[WeekOfEvents]:
    counts: dict[tuple[date, str], dict[str, int]] = {}
    for r in rows:
        counts.setdefault((r["week"], r["event_type"]), {})[r["channel"]] = r["n"]
    found = []
    for (week, event_type), by_channel in sorted(counts.items()):
        channels = [*CHANNELS, UNRECORDED]
        raw = [by_channel.get(c, 0) for c in channels]
        shown = suppress(raw, with_total=True)
        found.append(
            WeekOfEvents(week, event_type, dict(zip(channels, shown, strict=True)), hide_small(sum(raw)))
        )
    return found


def _outcomes(rows: Sequence[asyncpg.Record]) -> list[OutcomeShare]:
    raw = {r["outcome"]: r["n"] for r in rows}
    names = [*OUTCOME_WORDS, *sorted(set(raw) - set(OUTCOME_WORDS))]
    shown = suppress([raw.get(o, 0) for o in names], with_total=True)
    total = hide_small(sum(raw.values()))
    return [OutcomeShare(o, n, share(n, total)) for o, n in zip(names, shown, strict=True) if o in raw]


def _agencies(rows: Sequence[asyncpg.Record], overdue: dict[str, int]) -> list[AgencyFigures]:
    found = []
    by_agency = {r["agency"]: r for r in rows}
    for agency in sorted(set(by_agency) | set(overdue), key=agency_name):
        r = by_agency.get(agency)
        delivered = due = within = 0
        median: float | None = None
        if r is not None:
            delivered, due, within = r["delivered"], r["due"], r["within"]
            median = r["median_seconds"] if r["receipted"] >= SMALLEST_SHOWN else None
        # What can be worked out by subtraction is a count too: the deliveries not yet due
        # (delivered - due) and the late ones (due - within). Hiding one hides what reveals it.
        shown_delivered, shown_due, shown_within, not_yet, late = suppress(
            [delivered, due, within, delivered - due, due - within]
        )
        if not_yet is None:
            shown_due = None
        if late is None or shown_due is None:
            shown_within = None
        found.append(
            AgencyFigures(
                agency=agency,
                delivered=shown_delivered,
                due=shown_due,
                within_deadline=shown_within,
                share_within=share(shown_within, shown_due),
                median_seconds=median,
                overdue_now=hide_small(overdue.get(agency, 0)),
            )
        )
    return found


# --- The pages -------------------------------------------------------------------------


def week_words(week: date, until: datetime) -> str:
    current = week + timedelta(days=7) > until.astimezone(LONDON).date()
    return f"{week:%-d %b %Y}" + (" (so far)" if current else "")


def charts(found: Figures) -> dict[str, list[tuple[str, Markup]]]:
    """The charts of each section, as (heading, SVG)."""
    by_type: dict[str, dict[date, int | None]] = {}
    for w in found.events:
        by_type.setdefault(w.event_type, {})[w.week] = w.total
    events = [
        (
            f"{event_name(event_type)} each week",
            bar_chart(
                f"events-{i}",
                f"{event_name(event_type)}, by week beginning",
                [
                    Bar(week_words(week, found.until), n, count_text(n))
                    for week in found.weeks
                    for n in [weeks.get(week, 0)]
                ],
            ),
        )
        for i, (event_type, weeks) in enumerate(sorted(by_type.items(), key=lambda t: event_name(t[0])))
    ]
    outcomes = [
        (
            "What happened to each routing decision",
            bar_chart(
                "outcomes",
                "Share of routing decisions by outcome",
                [
                    Bar(OUTCOME_WORDS.get(o.outcome, o.outcome), o.share, share_text(o.share))
                    for o in found.outcomes
                ],
                scale_to=1.0,
            ),
        )
    ]
    agencies = found.agencies
    by_agency = [
        (
            "Receipts within the deadline",
            bar_chart(
                "within",
                "Share of due deliveries receipted within the deadline, by organisation",
                [Bar(agency_name(a.agency), a.share_within, share_text(a.share_within)) for a in agencies],
                scale_to=1.0,
            ),
        ),
        (
            "Median time to a receipt",
            bar_chart(
                "median",
                "Median time from delivery to the organisation's receipt",
                [
                    Bar(agency_name(a.agency), a.median_seconds, duration_text(a.median_seconds))
                    for a in agencies
                ],
            ),
        ),
        (
            "Overdue now",
            bar_chart(
                "overdue",
                "Deliveries without a receipt past their deadline now, by organisation",
                [Bar(agency_name(a.agency), a.overdue_now, count_text(a.overdue_now)) for a in agencies],
            ),
        ),
    ]
    repairs = [
        (
            "Replays and redeliveries",
            bar_chart(
                "repairs",
                "Events sent again by replays, and redeliveries, by week beginning",
                [
                    bar
                    for r in found.repairs
                    for bar in (
                        Bar(
                            f"{week_words(r.week, found.until)}: replayed",
                            r.replayed_events,
                            count_text(r.replayed_events),
                        ),
                        Bar(
                            f"{week_words(r.week, found.until)}: redelivered",
                            r.redeliveries,
                            count_text(r.redeliveries),
                        ),
                    )
                ],
            ),
        )
    ]
    return {"events": events, "outcomes": outcomes, "agencies": by_agency, "repairs": repairs}


class Cached:
    """The last figures read, for ``CACHE_SECONDS``."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], default_deadline: timedelta) -> None:
        self.pool = pool
        self.default_deadline = default_deadline
        self.last: Figures | None = None

    async def figures(self) -> Figures:
        if self.last is None or time.monotonic() - self.last.read_at > CACHE_SECONDS:
            until = datetime.now(UTC)
            self.last = await figures(
                self.pool(), self.default_deadline, since=first_week(until), until=until
            )
        return self.last


router = APIRouter(include_in_schema=False)


@router.get(PATHS["html"])
async def performance_page(request: Request) -> Response:
    found = await request.app.state.performance.figures()
    response = render(
        "performance.html",
        None,
        title="How Tell Us Once is performing",
        figures=found,
        charts=charts(found),
        channels=CHANNELS,
        unrecorded=UNRECORDED,
        outcome_words=OUTCOME_WORDS,
        event_name=event_name,
        agency_name=agency_name,
        week_words=week_words,
        count_text=count_text,
        share_text=share_text,
        duration_text=duration_text,
        licence=LICENCE,
        paths=PATHS,
        smallest=SMALLEST_SHOWN,
    )
    return public(response, f"public, max-age={CACHE_SECONDS:.0f}")


@router.get(PATHS["json"])
async def performance_json(request: Request) -> Response:
    found = await request.app.state.performance.figures()
    body = {"title": "Tell Us Once: performance", "licence": LICENCE, "url": PATHS["json"], **found.to_json()}
    return public(
        Response(json.dumps(body, indent=1), media_type="application/json"),
        f"public, max-age={CACHE_SECONDS:.0f}",
    )


def install_performance(app: FastAPI, pool: Callable[[], asyncpg.Pool], default_deadline: timedelta) -> None:
    app.state.performance = Cached(pool, default_deadline)
    app.include_router(router)
