"""The citizens' pages: "My consents" (see and change who may be told what, with a
signed consent receipt for every change), the history of those choices, every
consent receipt issued about them (each downloadable, whoever made the choice), "Who
received my data" (per event, per agency: told or not and why, which fields, on
what legal basis, and what the agency did), and a download of all of it as JSON.

Every page is about one person only: the signed-in citizen, or, when a proxy
chooses to act for someone (``?for=<appointment id>``), the person their current
appointment names, limited to the agencies it covers. The subject is never taken
from the request: a form that names another subject is refused, and so is a
change to a statutory sharing, to anything unknown or outside the appointment,
or a form without the session's CSRF token; nothing is written then.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, cast
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from starlette.responses import HTMLResponse, Response

from citizens import data_tracker, proxies
from citizens.proxies import Appointment, NotAppointed
from citizens.signin import Citizen, CurrentCitizen
from router import looks
from router.consent_changes import record_consent_change
from router.consent_receipts import (
    JWKS_PATH,
    consent_signer,
    issue_consent_receipt,
    receipt_of,
    receipts_of,
)
from router.organisations import agency_name
from router.rules import ConsentState
from runtime.settings import Settings
from runtime.web import pages
from runtime.web.pages import redirect
from runtime.web.sessions import same_secret

log = structlog.get_logger(__name__)

UK = ZoneInfo("Europe/London")
MAX_FORM_FIELDS = 20
# A "no" on the form is a refusal, or a withdrawal when consent had been given.
_CHOICES = frozenset({"given", "no", "refused", "withdrawn"})


def _when(moment: datetime | str | None) -> str:
    if moment is None:
        return ""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    local = moment.astimezone(UK)
    return f"{local.day} {local:%B %Y} at {local:%H:%M}"


pages.environment.filters["when"] = _when


@dataclass(frozen=True)
class Scope:
    """Whose data a request is about, and how much of it the signed-in person may see."""

    citizen: Citizen
    appointment: Appointment | None

    @property
    def subject_id(self) -> str:
        return self.appointment.subject_id if self.appointment else self.citizen.subject_id

    @property
    def agencies(self) -> frozenset[str] | None:
        return self.appointment.agencies if self.appointment else None

    @property
    def recorded_by(self) -> Literal["citizen", "proxy"]:
        return "proxy" if self.appointment else "citizen"

    @property
    def query(self) -> str:
        """What keeps the pages acting for the same person: appended to links."""
        return f"?for={self.appointment.id}" if self.appointment else ""

    def covers(self, agency: str) -> bool:
        return self.appointment is None or self.appointment.covers(agency)


def render(template: str, scope: Scope | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    return pages.render(
        template,
        status_code,
        scope=scope,
        citizen=scope.citizen if scope else None,
        **context,
    )


def refuse(scope: Scope | None, status_code: int, title: str, *lines: str) -> HTMLResponse:
    back = "/citizen/consents" + (scope.query if scope else "")
    return render("citizen_message.html", scope, status_code, title=title, lines=list(lines), back=back)


class CannotActFor(Exception):
    """The signed-in citizen asked to act for someone their current appointments do not name."""

    def __init__(self, citizen: Citizen, refused: NotAppointed) -> None:
        super().__init__(str(refused))
        self.citizen = citizen
        self.appointment_id = refused.appointment_id


async def cannot_act_for(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CannotActFor)
    log.info(
        "citizen_proxy_refused",
        subject_id=exc.citizen.subject_id,
        appointment=exc.appointment_id,
        reason="no current appointment",
    )
    return refuse(
        Scope(exc.citizen, None),
        403,
        "You cannot act for this person",
        "You do not hold a current appointment to act for them. It may have ended or expired.",
        "If you think this is wrong, contact the office that recorded your appointment.",
    )


# The settings and the database pool, put on the app by ``install_citizen_pages``.
def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.citizen_settings
    return settings


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.citizen_pool
    return pool


AppSettings = Annotated[Settings, Depends(_settings)]
Pool = Annotated[asyncpg.Pool, Depends(_pool)]


async def scope_for(pool: asyncpg.Pool, settings: Settings, citizen: Citizen, acting: str | None) -> Scope:
    """Whose data: the citizen's own, or (``acting``: an appointment id) that of the person
    their current appointment names; ``CannotActFor`` if it names no one."""
    if not acting:
        return Scope(citizen, None)
    try:
        return Scope(citizen, await proxies.acting_for(pool, settings, citizen.subject_id, acting))
    except NotAppointed as refused:
        raise CannotActFor(citizen, refused) from refused


async def _requested_scope(
    citizen: CurrentCitizen,
    pool: Pool,
    settings: AppSettings,
    acting: Annotated[str | None, Query(alias="for")] = None,
) -> Scope:
    return await scope_for(pool, settings, citizen, acting)


# Whose data a page shows: the signed-in citizen's, or (``?for=<appointment id>``) that of
# the person they act for.
RequestedScope = Annotated[Scope, Depends(_requested_scope)]

router = APIRouter(include_in_schema=False)


@router.get("/citizen")
async def home(citizen: CurrentCitizen, pool: Pool, settings: AppSettings) -> Response:
    appointments = await proxies.appointments_of(pool, settings, citizen.subject_id)
    return render(
        "citizen_home.html", Scope(citizen, None), title="Your information", appointments=appointments
    )


@router.get("/citizen/act-for/{appointment_id}")
async def act_for(
    appointment_id: str, citizen: CurrentCitizen, pool: Pool, settings: AppSettings
) -> Response:
    scope = await scope_for(pool, settings, citizen, appointment_id)
    return redirect("/citizen/consents" + scope.query)


@router.get("/citizen/consents")
async def consents_page(scope: RequestedScope, pool: Pool) -> Response:
    settings_now = await data_tracker.consent_settings(pool, scope.subject_id, scope.agencies)
    return render("citizen_consents.html", scope, title="Who may be told what", settings=settings_now)


@router.post("/citizen/consents")
async def change_consent(
    request: Request, citizen: CurrentCitizen, pool: Pool, settings: AppSettings
) -> Response:
    form = await request.form(max_fields=MAX_FORM_FIELDS, max_files=0)
    given = {name: value for name, value in form.items() if isinstance(value, str)}
    if not same_secret(citizen.csrf_token, given.get("csrf_token")):
        log.info("citizen_consent_refused", subject_id=citizen.subject_id, reason="csrf")
        return refuse(
            Scope(citizen, None),
            403,
            "Your choice was not saved",
            "The form had expired or was not sent from this service. Go back and try again.",
        )
    scope = await scope_for(pool, settings, citizen, given.get("for") or None)
    if given.get("subject_id") != scope.subject_id:
        log.info("citizen_consent_refused", subject_id=citizen.subject_id, reason="another subject")
        return refuse(
            scope,
            403,
            "Your choice was not saved",
            "You can only change choices for yourself, or for someone you are appointed to act for.",
        )
    agency, event_type, choice = given.get("agency", ""), given.get("event_type", ""), given.get("choice")
    setting = (
        await data_tracker.consent_setting(pool, scope.subject_id, agency, event_type)
        if scope.covers(agency)
        else None
    )
    if setting is None:
        log.info("citizen_consent_refused", subject_id=citizen.subject_id, reason="unknown or not covered")
        return refuse(
            scope,
            400,
            "Your choice was not saved",
            "There is no sharing of that kind you can change here.",
        )
    if not setting.changeable:
        return refuse(
            scope,
            400,
            "This sharing cannot be changed",
            f"The law requires us to tell {setting.agency_name} about "
            f"{setting.event_name.lower()}: {setting.statute}. You cannot opt out of it.",
        )
    if choice not in _CHOICES:
        # The form again, with an error summary linked to the question left unanswered.
        return render(
            "citizen_consents.html",
            scope,
            400,
            title="Who may be told what",
            settings=await data_tracker.consent_settings(pool, scope.subject_id, scope.agencies),
            error={
                "id": f"choice-{setting.agency}-{setting.event_type}",
                "text": f"Choose Yes or No: may {setting.agency_name} be told about "
                f"{setting.event_name.lower()}?",
            },
        )
    if choice == "no":
        choice = "withdrawn" if setting.choice == "given" else "refused"
    # A withdrawal (or refusal) is also written, signed, for the agencies that hold data
    # under this consent, in the same transaction (see router.consent_changes).
    recorded = await record_consent_change(
        pool,
        settings,
        subject_id=scope.subject_id,
        agency=agency,
        event_type=event_type,
        choice=cast(ConsentState, choice),
        recorded_by=scope.recorded_by,
        signer=await consent_signer(pool, settings),
        appointment_id=scope.appointment.id if scope.appointment else None,
    )
    recorded_at = recorded.confirmed_at
    receipt = await issue_consent_receipt(
        pool,
        settings,
        subject_id=scope.subject_id,
        agency=agency,
        event_type=event_type,
        choice=choice,
        recorded_by=scope.recorded_by,
        recorded_at=recorded_at,
    )
    log.info(
        "citizen_consent_changed",
        subject_id=scope.subject_id,
        agency=agency,
        event_type=event_type,
        choice=choice,
        recorded_by=scope.recorded_by,
    )
    return render(
        "citizen_consent_saved.html",
        scope,
        title="Your choice is saved",
        setting=setting,
        choice=choice,
        choice_words=data_tracker.CHOICE_WORDS[choice],
        recorded_at=recorded_at,
        agencies_told=recorded.change_id is not None,
        receipt=receipt,
        keys_path=JWKS_PATH,
    )


@router.get("/citizen/history")
async def history(scope: RequestedScope, pool: Pool) -> Response:
    changes = await data_tracker.consent_history(pool, scope.subject_id, scope.agencies)
    return render("citizen_history.html", scope, title="Changes to your choices", changes=changes)


@router.get("/citizen/consent-receipts")
async def consent_receipts(scope: RequestedScope, pool: Pool) -> Response:
    receipts = [
        {
            "receipt": receipt,
            "agency_name": agency_name(receipt.agency),
            "event_name": data_tracker.event_name(receipt.event_type),
            "choice_words": data_tracker.CHOICE_WORDS.get(receipt.choice, receipt.choice),
            "recorded_by_words": data_tracker.RECORDED_BY_WORDS.get(receipt.recorded_by, ""),
        }
        for receipt in await receipts_of(pool, scope.subject_id, scope.agencies)
    ]
    return render(
        "citizen_consent_receipts.html",
        scope,
        title="Your consent receipts",
        receipts=receipts,
        keys_path=JWKS_PATH,
    )


@router.get("/citizen/consent-receipts/{receipt_id}")
async def consent_receipt_download(receipt_id: str, scope: RequestedScope, pool: Pool) -> Response:
    try:
        wanted = uuid.UUID(receipt_id)
    except ValueError:
        wanted = None
    # Someone else's receipt, or one outside a proxy's appointment, is as absent as a made-up one.
    found = None if wanted is None else await receipt_of(pool, scope.subject_id, wanted, scope.agencies)
    if found is None:
        return refuse(
            scope,
            404,
            "There is no such receipt",
            "Check the link, or find the receipt in your list of consent receipts.",
        )
    return _download(found.token, "application/jwt", found.filename)


@router.get("/citizen/received")
async def received(scope: RequestedScope, pool: Pool) -> Response:
    events = await data_tracker.received(pool, scope.subject_id, scope.agencies)
    # Who looked at their records is theirs to see, not a proxy's (an appointment covers agencies).
    seen = await looks.looks_at(pool, scope.subject_id) if scope.recorded_by == "citizen" else None
    return render(
        "citizen_received.html",
        scope,
        title="Who received your information",
        events=events,
        looks=seen,
        look_role=_look_role,
    )


def _look_role(look: looks.Look) -> str:
    return "A Tell Us Once operator" if look.role == "operator" else "A registrar at another register office"


@router.get("/citizen/download")
async def download(scope: RequestedScope, pool: Pool) -> Response:
    body = await data_tracker.everything(pool, scope.subject_id, scope.agencies)
    body["consent_receipts"] = [
        {
            "receipt_id": str(r.receipt_id),
            "agency": r.agency,
            "event_type": r.event_type,
            "choice": r.choice,
            "recorded_by": r.recorded_by,
            "recorded_at": r.recorded_at.isoformat(),
            "receipt": r.token,
        }
        for r in await receipts_of(pool, scope.subject_id, scope.agencies)
    ]
    body["downloaded_by"] = scope.recorded_by
    return _download(
        json.dumps(body, indent=2, ensure_ascii=False), "application/json", "tell-us-once-my-information.json"
    )


def _download(content: str, media_type: str, filename: str) -> Response:
    """A file to save, never kept by a cache: it is about one person."""
    return Response(
        content,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )


def install_citizen_pages(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
    """Mount the citizens' pages on ``app`` (which must have ``install_citizen_sign_in``)."""
    app.state.citizen_settings = settings
    app.state.citizen_pool = pool
    app.include_router(router)
    app.add_exception_handler(CannotActFor, cannot_act_for)
