"""The public register of sharing agreements: ``GET /register`` (a page), and the same as
open data, ``GET /register.json`` and ``GET /register.csv``, under the Open Government
Licence. For every agency and event type it says what the agency is told, on what legal
basis and under which statute, on what condition, for how long, and every earlier
version of those terms: when each was in force, and why it changed.

It is read, per request, from ``subscription`` (the very rows the router decides on) and
``subscription_version`` (migration 0035's history of them), so it cannot drift from what
the router does. It holds no personal data: who changed a version is given as a role
(an operator; the agency, at its request; approved by an operator), never a name. The
reasons given for changes are published: `tuo subscriptions` and the agencies' API say so.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from citizens.data_tracker import event_name, field_words
from citizens.pages import render
from router.organisations import agency_name
from router.rules import Condition
from router.subscription_versions import Terms

LICENCE = {
    "name": "Open Government Licence v3.0",
    "url": "https://www.nationalarchives.gov.uk/doc/open-government-licence/version/3/",
}
PATHS = {"html": "/register", "json": "/register.json", "csv": "/register.csv"}
CSV_COLUMNS = (
    "agency",
    "organisation",
    "event_type",
    "version",
    "in_force_now",
    "in_force_from",
    "in_force_to",
    "status",
    "legal_basis",
    "statute",
    "fields",
    "condition",
    "valid_from",
    "valid_to",
    "changed_by",
    "reason",
)


@dataclass(frozen=True)
class Version:
    """One version of one agreement, as the register publishes it."""

    version: int
    terms: Terms
    in_force_from: datetime
    in_force_to: datetime | None
    changed_by: str  # a role, never a name
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **_terms_json(self.terms),
            "in_force_from": self.in_force_from.isoformat(),
            "in_force_to": None if self.in_force_to is None else self.in_force_to.isoformat(),
            "changed_by": self.changed_by,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Agreement:
    """What one agency is told of one event type now (the row the router reads), and
    every version of it, oldest first."""

    agency: str
    organisation: str
    event_type: str
    event_name: str
    version: int
    terms: Terms
    versions: list[Version]

    @property
    def earlier(self) -> list[Version]:
        return [v for v in self.versions if v.version != self.version]

    def to_json(self) -> dict[str, Any]:
        return {
            "agency": self.agency,
            "organisation": self.organisation,
            "event_type": self.event_type,
            "version": self.version,
            **_terms_json(self.terms),
            "versions": [v.to_json() for v in self.versions],
        }


def _terms_json(terms: Terms) -> dict[str, Any]:
    return {
        "status": terms.status,
        "legal_basis": terms.legal_basis,
        "statute": terms.statute,
        "fields": None if terms.fields is None else sorted(terms.fields),
        "condition": terms.condition.to_json(),
        "condition_words": condition_words(terms.condition),
        "valid_from": None if terms.valid_from is None else terms.valid_from.isoformat(),
        "valid_to": None if terms.valid_to is None else terms.valid_to.isoformat(),
    }


def condition_words(condition: Condition) -> str:
    """A subscription's condition as a member of the public would read it."""
    parts = []
    if condition.local_authorities:
        parts.append(
            "only about people who live or lived in local authority "
            + ", ".join(sorted(condition.local_authorities))
        )
    if condition.postcode_areas:
        parts.append(
            "only about people with an address in postcode area "
            + ", ".join(sorted(condition.postcode_areas))
        )
    if condition.registered_subjects:
        parts.append("only about people the organisation has told us it holds records for")
    return "; ".join(parts).capitalize() if parts else "About everyone"


def _role(changed_by: str, approved_by: str | None, change_id: int | None) -> str:
    if change_id is not None:
        if approved_by:
            return f"the agency, at its request {change_id}, approved by an operator"
        return f"the agency, at its request {change_id} (a narrowing, in force at once)"
    if changed_by == "migration 0035":
        return "in force when versions began to be kept"
    if changed_by == "seed":
        return "the service's initial set-up"
    return "an operator"


async def agreements(pool: asyncpg.Pool) -> list[Agreement]:
    """Every agreement, by event type and organisation, in one snapshot of the database."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        current = await conn.fetch(
            "SELECT agency, event_type, legal_basis, statute, fields, condition::text AS condition,"
            "       valid_from, valid_to, status, version FROM subscription"
        )
        history = await conn.fetch(
            "SELECT id, agency, event_type, legal_basis, statute, fields, condition::text AS condition,"
            "       valid_from, valid_to, status, in_force_from, in_force_to, changed_by, approved_by,"
            "       reason, change_id"
            "  FROM subscription_version ORDER BY id"
        )
    versions: dict[tuple[str, str], list[Version]] = {}
    for r in history:
        versions.setdefault((r["agency"], r["event_type"]), []).append(
            Version(
                r["id"],
                Terms.of(r),
                r["in_force_from"],
                r["in_force_to"],
                _role(r["changed_by"], r["approved_by"], r["change_id"]),
                r["reason"],
            )
        )
    found = [
        Agreement(
            r["agency"],
            agency_name(r["agency"]),
            r["event_type"],
            event_name(r["event_type"]),
            r["version"],
            Terms.of(r),
            versions.get((r["agency"], r["event_type"]), []),
        )
        for r in current
    ]
    return sorted(found, key=lambda a: (a.event_name, a.organisation, a.agency))


def register_csv(found: list[Agreement]) -> str:
    """One row per version of every agreement."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for a in found:
        for v in a.versions:
            t = v.to_json()
            writer.writerow(
                _cell(value)
                for value in (
                    a.agency,
                    a.organisation,
                    a.event_type,
                    v.version,
                    "yes" if v.version == a.version else "no",
                    t["in_force_from"],
                    t["in_force_to"] or "",
                    t["status"],
                    t["legal_basis"],
                    t["statute"] or "",
                    "*" if t["fields"] is None else " ".join(t["fields"]),
                    t["condition_words"],
                    t["valid_from"] or "",
                    t["valid_to"] or "",
                    t["changed_by"],
                    t["reason"],
                )
            )
    return out.getvalue()


def _cell(value: object) -> str:
    """A cell no spreadsheet will run as a formula (a reason is free text)."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


router = APIRouter(include_in_schema=False)


@router.get(PATHS["html"])
async def register_page(request: Request) -> Response:
    found = await agreements(request.app.state.register_pool())
    response = render(
        "register.html",
        None,
        title="Register of sharing agreements",
        agreements=found,
        field_words=field_words,
        condition_words=condition_words,
        licence=LICENCE,
        paths=PATHS,
    )
    return public(response)


@router.get(PATHS["json"])
async def register_json(request: Request) -> Response:
    found = await agreements(request.app.state.register_pool())
    body = {
        "title": "Tell Us Once: register of sharing agreements",
        "licence": LICENCE,
        "url": PATHS["json"],
        "agreements": [a.to_json() for a in found],
    }
    return public(Response(json.dumps(body, indent=1), media_type="application/json"))


@router.get(PATHS["csv"])
async def register_csv_file(request: Request) -> Response:
    found = await agreements(request.app.state.register_pool())
    response = Response(register_csv(found), media_type="text/csv; charset=utf-8")
    response.headers["Content-Disposition"] = 'inline; filename="tell-us-once-register.csv"'
    return public(response)


def public(response: Response, cache_control: str = "public, no-cache") -> Response:
    """Open data: anyone may read it, from any origin, under the licence. By default a
    change shows at once, so caches must ask again each time."""
    response.headers["Cache-Control"] = cache_control
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Link"] = f'<{LICENCE["url"]}>; rel="license"'
    return response


def install_register(app: FastAPI, pool: Callable[[], asyncpg.Pool]) -> None:
    app.state.register_pool = pool
    app.include_router(router)
