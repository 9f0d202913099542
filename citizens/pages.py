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
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from jinja2 import (
    ChainableUndefined,
    ChoiceLoader,
    Environment,
    PackageLoader,
    PrefixLoader,
    select_autoescape,
)
from starlette.responses import HTMLResponse, Response

from citizens import data_tracker, proxies
from citizens.proxies import Appointment, NotAppointed
from citizens.signin import Citizen, current_citizen
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
from runtime.web.pages import SERVICE_NAME, protect, redirect
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


environment = Environment(
    loader=ChoiceLoader(
        [
            PackageLoader("citizens", "templates"),
            PrefixLoader({"govuk_frontend_jinja": PackageLoader("govuk_frontend_jinja")}),
        ]
    ),
    autoescape=select_autoescape(["html"], default=True),
    undefined=ChainableUndefined,
)
environment.filters["when"] = _when


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
    nonce = secrets.token_urlsafe(16)
    html = environment.get_template(template).render(
        cspNonce=nonce,
        serviceName=SERVICE_NAME,
        scope=scope,
        citizen=scope.citizen if scope else None,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    protect(response, nonce)
    return response


def refuse(scope: Scope | None, status_code: int, title: str, *lines: str) -> HTMLResponse:
    back = "/citizen/consents" + (scope.query if scope else "")
    return render("citizen_message.html", scope, status_code, title=title, lines=list(lines), back=back)


def citizen_pages(settings: Settings, pool: asyncpg.Pool) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    async def scope_for(citizen: Citizen, acting: str | None) -> Scope:
        if not acting:
            return Scope(citizen, None)
        return Scope(citizen, await proxies.acting_for(pool, settings, citizen.subject_id, acting))

    def not_appointed(citizen: Citizen, refused: NotAppointed) -> HTMLResponse:
        log.info(
            "citizen_proxy_refused",
            subject_id=citizen.subject_id,
            appointment=refused.appointment_id,
            reason="no current appointment",
        )
        return refuse(
            Scope(citizen, None),
            403,
            "You cannot act for this person",
            "You do not hold a current appointment to act for them. It may have ended or expired.",
            "If you think this is wrong, contact the office that recorded your appointment.",
        )

    @router.get("/citizen")
    async def home(citizen: Citizen = Depends(current_citizen)) -> Response:  # noqa: B008
        appointments = await proxies.appointments_of(pool, settings, citizen.subject_id)
        return render(
            "citizen_home.html", Scope(citizen, None), title="Your information", appointments=appointments
        )

    @router.get("/citizen/act-for/{appointment_id}")
    async def act_for(appointment_id: str, citizen: Citizen = Depends(current_citizen)) -> Response:  # noqa: B008
        try:
            scope = await scope_for(citizen, appointment_id)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
        return redirect("/citizen/consents" + scope.query)

    @router.get("/citizen/consents")
    async def consents_page(
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
        settings_now = await data_tracker.consent_settings(pool, scope.subject_id, scope.agencies)
        return render("citizen_consents.html", scope, title="Who may be told what", settings=settings_now)

    @router.post("/citizen/consents")
    async def change_consent(request: Request, citizen: Citizen = Depends(current_citizen)) -> Response:  # noqa: B008
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
        try:
            scope = await scope_for(citizen, given.get("for") or None)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
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
            log.info(
                "citizen_consent_refused", subject_id=citizen.subject_id, reason="unknown or not covered"
            )
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
    async def history(
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
        changes = await data_tracker.consent_history(pool, scope.subject_id, scope.agencies)
        return render("citizen_history.html", scope, title="Changes to your choices", changes=changes)

    @router.get("/citizen/consent-receipts")
    async def consent_receipts(
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
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
    async def consent_receipt_download(
        receipt_id: str,
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
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
        return Response(
            found.token,
            media_type="application/jwt",
            headers={
                "Content-Disposition": f'attachment; filename="{found.filename}"',
                "Cache-Control": "no-store",
            },
        )

    @router.get("/citizen/received")
    async def received(
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
        events = await data_tracker.received(pool, scope.subject_id, scope.agencies)
        return render("citizen_received.html", scope, title="Who received your information", events=events)

    @router.get("/citizen/download")
    async def download(
        citizen: Citizen = Depends(current_citizen),  # noqa: B008
        acting: str | None = Query(None, alias="for"),
    ) -> Response:
        try:
            scope = await scope_for(citizen, acting)
        except NotAppointed as refused:
            return not_appointed(citizen, refused)
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
        return Response(
            json.dumps(body, indent=2, ensure_ascii=False),
            media_type="application/json",
            headers={
                "Content-Disposition": 'attachment; filename="tell-us-once-my-information.json"',
                "Cache-Control": "no-store",
            },
        )

    return router


def install_citizen_pages(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
    """Mount the citizens' pages on ``app`` (which must have ``install_citizen_sign_in``)."""
    app.include_router(citizen_pages(settings, pool))
