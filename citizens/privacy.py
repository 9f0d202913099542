"""The privacy notice, ``GET /privacy``: what Tell Us Once does with personal data,
who the controller is, on which lawful basis each organisation is told (the law,
or the person's consent), how long records are kept, the person's rights, and how
to withdraw consent. Every consent receipt names this page as its ``policyUrl``.

The sharing it lists is read from the subscriptions in force when the page is
asked for, so the notice cannot drift from what the router actually does. It is
public: no sign-in, nothing about any one person.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from citizens.data_tracker import event_name
from citizens.pages import render
from router.consent_receipts import CONTROLLER, JWKS_PATH, POLICY_PATH
from router.organisations import agency_name

# How long each kind of record is kept: stated here once, shown on the notice.
RETENTION: tuple[tuple[str, str], ...] = (
    (
        "Registrations of births, deaths and changes of address that pass through Tell Us Once",
        "7 years from when the register office recorded them",
    ),
    (
        "The record of which organisations were told, what they were told, on what basis, and their receipts",
        "7 years from when the organisation was told, so that you can see it and we can account for it",
    ),
    (
        "Your consent choices and your consent receipts",
        "7 years from your last choice about that organisation, so that we can show what you agreed to",
    ),
    ("Records of who signed in to see or change your choices", "2 years"),
)


@dataclass(frozen=True)
class Sharing:
    """One organisation told about one kind of event, and why it may be."""

    agency_name: str
    event_name: str
    legal_basis: str  # statutory | consent
    statute: str | None


async def sharing_in_force(pool: asyncpg.Pool) -> list[Sharing]:
    """Every active subscription in force now, as the notice names it."""
    rows = await pool.fetch(
        "SELECT DISTINCT agency, event_type, legal_basis, statute FROM subscription"
        " WHERE status = 'active'"
        "   AND (valid_from IS NULL OR valid_from <= now())"
        "   AND (valid_to IS NULL OR valid_to > now())"
    )
    sharing = [
        Sharing(agency_name(r["agency"]), event_name(r["event_type"]), r["legal_basis"], r["statute"])
        for r in rows
    ]
    return sorted(sharing, key=lambda s: (s.event_name, s.agency_name))


router = APIRouter(include_in_schema=False)


@router.get(POLICY_PATH)
async def privacy_notice(request: Request) -> Response:
    pool_of: Callable[[], asyncpg.Pool] = request.app.state.privacy_notice_pool
    sharing = await sharing_in_force(pool_of())
    response = render(
        "privacy_notice.html",
        None,
        title="Privacy notice",
        controller=CONTROLLER,
        statutory=[s for s in sharing if s.legal_basis == "statutory"],
        by_consent=[s for s in sharing if s.legal_basis == "consent"],
        retention=RETENTION,
        jwks_path=JWKS_PATH,
    )
    # The same for everyone: shared caches may keep it for a while.
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def install_privacy_notice(app: FastAPI, pool: Callable[[], asyncpg.Pool]) -> None:
    """Serve ``GET /privacy`` on ``app``; ``pool`` gives the database pool when a request
    comes (the service may open it only once it has started)."""
    app.state.privacy_notice_pool = pool
    app.include_router(router)
