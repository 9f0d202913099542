"""The informant's own journey at ``/tell-us-once``: the reference the registrar gave
them, with the date of birth of the person registered, opens the registration for 28
days (``informant_reference_days``), so that the family can see which organisations
were told and what each did, and which more can be told with their consent.

Getting in is guarded as a sign-in is: five wrong answers for a reference lock it
(the register office can unlock it); a wrong reference and a wrong date of birth get
the same answer, so that guessing learns nothing about which references exist; and
each address has the sign-in allowance of ``runtime.web.rate_limit``. A right answer
starts an informant's session (``runtime.web.sessions``), in a table and a cookie of
its own, separate from registrars' and citizens': it opens that one registration and
nothing else. The journey is the informant's, not the office's: any office's
reference works.

From there the informant chooses more organisations to tell (those subscribed to
``ServicesRequested`` on consent, whose condition holds for the registration), gives
the details each needs (a driving licence number checked against the surname and date
of birth registered, a passport number), confirms they have the permission of the
people whose details they give, checks their answers and confirms: the request is
recorded by intake (``RequestServices``, handed in by ``operators.web``: citizens do not
import producers) as the informant's consent to each, with a consent receipt, and one
``ServicesRequested`` event that each chosen organisation receives cut to its own
details. Each organisation is asked once per registration.

Where the service has a mail server, the informant may give an email address for two
confirmations (``citizens.emails``). The phone agent's way through the same journey is
the next step; it is not built yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlencode

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import Response

from citizens import data_tracker, emails
from router.organisations import agency_name
from router.registrations import (
    DETAIL_NAMES,
    ONLINE_OFFICE,
    PERSON_REGISTERED,
    SERVICE_DETAILS,
    RequestRefused,
    Service,
    as_corrected,
    request_problems,
    requests_following,
    services,
)
from router.store import StoredEvent, event_status, original_event
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from runtime.web import pages
from runtime.web.i18n import N_, LanguageChoice, add_catalogue
from runtime.web.i18n import gettext as _
from runtime.web.pages import redirect
from runtime.web.rate_limit import INFORMANT_SIGN_IN_PATH
from runtime.web.sessions import (
    PHONE_JOURNEY_PATH,
    REGISTRAR_SESSIONS,
    STAFF_SIGN_OUT_PATH,
    CookiePolicy,
    Expired,
    Session,
    SessionStore,
    same_secret,
    token_hash,
)
from schemas.validation import as_printed, is_reference, today_in_the_uk

log = structlog.get_logger(__name__)

pages.add_templates(Path(__file__).parent / "templates")
add_catalogue(Path(__file__).parent / "locale")  # its Welsh

START_PATH = "/tell-us-once"
OVERVIEW_PATH = "/tell-us-once/registration"
MAX_WRONG_ANSWERS = 5
# Every answer to a reference and date of birth goes out no sooner than this after the
# question came in. A reference nobody registered is answered after one look-up, a real
# one with a wrong date after opening the registration and counting the attempt: without
# a common floor the time taken would tell which references exist.
ANSWER_NO_SOONER_SECONDS = 0.25
SERVICES_PATH = "/tell-us-once/services"
CONFIRM_PATH = "/tell-us-once/services/confirm"
REGISTERED_TITLES = {
    "DeathRegistered": N_("The death you registered"),
    "BirthRegistered": N_("The birth you registered"),
}


class Outcome(Enum):
    OPENED = "opened"
    WRONG = "wrong"  # an unknown or voided reference, or a wrong date of birth
    LOCKED = "locked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Registration:
    event: StoredEvent
    locked: bool

    def expired(self, settings: Settings) -> bool:
        return self.event.recorded_at < datetime.now(UTC) - timedelta(days=settings.informant_reference_days)


@dataclass(frozen=True)
class InformantSession:
    token_hash: bytes
    reference: str
    csrf_token: str
    agent: str | None = None  # the contact-centre agent who opened it on the telephone


# Queries.


async def registration(pool: asyncpg.Pool, reference: str) -> Registration | None:
    """The registration a reference names, if it is one the journey can open."""
    found = await original_event(pool, reference)
    if found is None or found.event_type not in PERSON_REGISTERED or found.voided:
        return None
    locked = await pool.fetchval(
        "SELECT locked_at IS NOT NULL FROM informant_reference_lock WHERE reference = $1", reference
    )
    return Registration(found, bool(locked))


async def registered_date_of_birth(
    pool: asyncpg.Pool, sealer: PayloadSealer, found: Registration
) -> date | None:
    """The date of birth the registration holds now: as recorded, or as last corrected."""
    body = await as_corrected(pool, sealer, found.event)
    born: date | None = body[PERSON_REGISTERED[found.event.event_type]]["date_of_birth"]
    return born


async def record_wrong_answer(pool: asyncpg.Pool, reference: str) -> bool:
    """Count a wrong date of birth for a reference; True if that has locked it."""
    locked: bool = await pool.fetchval(
        "INSERT INTO informant_reference_lock AS l (reference, failures) VALUES ($1, 1)"
        " ON CONFLICT (reference) DO UPDATE SET failures = l.failures + 1, last_failed_at = now(),"
        "   locked_at = CASE WHEN l.failures + 1 >= $2 THEN coalesce(l.locked_at, now()) END"
        " RETURNING locked_at IS NOT NULL",
        reference,
        MAX_WRONG_ANSWERS,
    )
    return locked


async def clear_wrong_answers(pool: asyncpg.Pool, reference: str) -> None:
    await pool.execute(
        "DELETE FROM informant_reference_lock WHERE reference = $1 AND locked_at IS NULL", reference
    )


async def check_answer(
    pool: asyncpg.Pool, sealer: PayloadSealer, settings: Settings, reference: str, born: date
) -> tuple[Outcome, Registration | None]:
    found = await registration(pool, reference)
    if found is None:
        return Outcome.WRONG, None
    if found.locked:
        return Outcome.LOCKED, found
    if await registered_date_of_birth(pool, sealer, found) != born:
        return (Outcome.LOCKED if await record_wrong_answer(pool, reference) else Outcome.WRONG), found
    if found.expired(settings):
        return Outcome.EXPIRED, found
    await clear_wrong_answers(pool, reference)
    return Outcome.OPENED, found


async def requested_before(pool: asyncpg.Pool, event: StoredEvent) -> dict[str, datetime]:
    """The organisations already asked to be told of this registration, and when."""
    rows = await pool.fetch(
        "SELECT c.agency, min(i.recorded_at) AS asked_at FROM intake_record i"
        "  JOIN consent_receipt c ON c.event_id = i.event_id"
        " WHERE i.follows_event_id = $1 AND i.event_type = 'ServicesRequested'"
        " GROUP BY c.agency",
        event.event_id,
    )
    return {r["agency"]: r["asked_at"] for r in rows}


def _informant_session(row: asyncpg.Record, hashed: bytes, sealer: PayloadSealer) -> InformantSession:
    return InformantSession(hashed, row["reference"], row["csrf_token"], row["agent"])


INFORMANT_SESSIONS = SessionStore("informant_session", ("reference", "agent"), _informant_session)


@dataclass(frozen=True)
class Agent:
    username: str
    display_name: str
    csrf_token: str  # of their own session: the telephone pages offer its sign-out


async def agent_signed_in(request: Request, service: JourneyService) -> Agent | Response:
    """The contact-centre agent whose session (a registrar's, of role agent) the request
    carries; otherwise the page to go to instead."""
    token = request.cookies.get(service.cookies.session, "")
    found = (
        await REGISTRAR_SESSIONS.find(service.pool, service.sealer, token, service.settings)
        if token
        else None
    )
    if not isinstance(found, Session):
        return redirect(f"/sign-in?{urlencode({'next': PHONE_JOURNEY_PATH})}")
    row = await service.pool.fetchrow(
        "SELECT display_name FROM registrar WHERE username = $1 AND role = 'agent' AND disabled_at IS NULL",
        found.username,
    )
    if row is None:
        return message(
            403,
            _("Only contact-centre agents can use this page"),
            _("Informants use the reference themselves at Tell Us Once online."),
            link=(START_PATH, _("Go to the informant's start page")),
        )
    return Agent(found.username, row["display_name"], found.csrf_token)


# The form: what the informant typed, checked.


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    @property
    def href(self) -> str:
        return f"#{self.field}"


def read_answer(form: dict[str, str]) -> tuple[str, date | None, list[FieldError]]:
    errors: list[FieldError] = []
    reference = as_printed(form.get("reference", ""))
    if not reference:
        errors.append(FieldError("reference", _("Enter the reference from the registrar")))
    elif not is_reference(reference):
        errors.append(
            FieldError(
                "reference",
                _("Enter the reference as it is on the registrar's letter, like TUO-2026-ABCD-1234"),
            )
        )
    parts = {name: form.get(f"born-{name}", "").strip() for name in ("day", "month", "year")}
    born: date | None = None
    missing = [name for name, value in parts.items() if not value]
    if len(missing) == 3:
        errors.append(FieldError("born-day", _("Enter their date of birth")))
    elif missing:
        include = {
            "day": N_("Date of birth must include a day"),
            "month": N_("Date of birth must include a month"),
            "year": N_("Date of birth must include a year"),
        }
        errors.append(FieldError(f"born-{missing[0]}", _(include[missing[0]])))
    elif not all(value.isdigit() for value in parts.values()) or len(parts["year"]) != 4:
        errors.append(FieldError("born-day", _("Date of birth must be a real date, like 27 3 1950")))
    else:
        try:
            born = date(int(parts["year"]), int(parts["month"]), int(parts["day"]))
        except ValueError:
            errors.append(FieldError("born-day", _("Date of birth must be a real date, like 27 3 1950")))
        else:
            if born > today_in_the_uk():
                errors.append(FieldError("born-day", _("Date of birth must be in the past")))
                born = None
    return reference, born, errors


# The pages.


class RecordedRequest(Protocol):
    @property
    def event_id(self) -> uuid.UUID: ...

    @property
    def reference(self) -> str: ...


class RequestServices(Protocol):
    """Intake's ``Intake.request_services``: records the request, or raises ``RequestRefused``."""

    async def __call__(
        self,
        reference: str,
        agencies: Sequence[str],
        details: Mapping[str, str],
        *,
        channel: Literal["online", "phone"],
        recorded_by: str,
        idempotency_key: str,
    ) -> RecordedRequest: ...


@dataclass(frozen=True)
class JourneyService:
    settings: Settings
    pool: asyncpg.Pool
    sealer: PayloadSealer
    cookies: CookiePolicy
    request_services: RequestServices


def _service(request: Request) -> JourneyService:
    service: JourneyService = request.app.state.informant_journey
    return service


Journey = Annotated[JourneyService, Depends(_service)]
router = APIRouter()


def render(template: str, status_code: int = 200, **context: Any) -> Response:
    return pages.render(template, status_code, homepageUrl=START_PATH, serviceUrl=START_PATH, **context)


def message(status_code: int, title: str, *lines: str, link: tuple[str, str] | None = None) -> Response:
    return render("informant_message.html", status_code, title=title, lines=list(lines), link=link)


@router.get(START_PATH)
async def start(service: Journey) -> Response:
    days = service.settings.informant_reference_days
    return render("informant_start.html", title=_("Use the reference from the registrar"), days=days)


def wrong_answer() -> FieldError:
    return FieldError(
        "reference",
        _("The reference or the date of birth is not right: check both against the registrar's letter"),
    )


def _reference_form(
    status_code: int, errors: list[FieldError], values: dict[str, str], agent: Agent | None = None
) -> Response:
    return render(
        "informant_reference.html",
        status_code,
        title=_("Enter the reference"),
        back=None if agent else START_PATH,
        errors=errors,
        values=values,
        action=PHONE_JOURNEY_PATH if agent else INFORMANT_SIGN_IN_PATH,
        agent=agent,
        # Between calls, the agent's own sign-out: it ends their session, as a registrar's does.
        signOut={"action": STAFF_SIGN_OUT_PATH, "csrfToken": agent.csrf_token} if agent else None,
    )


@router.get(INFORMANT_SIGN_IN_PATH)
async def reference_form() -> Response:
    return _reference_form(200, [], {})


@router.post(INFORMANT_SIGN_IN_PATH)
async def enter_reference(request: Request, service: Journey) -> Response:
    return await _enter(request, service, None)


@router.get(PHONE_JOURNEY_PATH)
async def phone_form(request: Request, service: Journey) -> Response:
    agent = await agent_signed_in(request, service)
    return agent if isinstance(agent, Response) else _reference_form(200, [], {}, agent)


@router.post(PHONE_JOURNEY_PATH)
async def phone_reference(request: Request, service: Journey) -> Response:
    """An agent on the telephone enters what the informant reads out: the same checks,
    the same lock, and a session that names the agent."""
    agent = await agent_signed_in(request, service)
    return agent if isinstance(agent, Response) else await _enter(request, service, agent)


async def _enter(request: Request, service: JourneyService, agent: Agent | None) -> Response:
    # Only the fields asked for, each cut to what any right answer could be: an oversized
    # one is refused as malformed, and never shown back whole.
    given = await request.form()
    form = {
        name: value[:100]
        for name in ("reference", "born-day", "born-month", "born-year")
        if isinstance(value := given.get(name, ""), str)
    }
    reference, born, errors = read_answer(form)
    if errors or born is None:
        return _reference_form(400, errors, form, agent)
    asked_at = time.monotonic()
    outcome, found = await check_answer(service.pool, service.sealer, service.settings, reference, born)
    await asyncio.sleep(max(0.0, asked_at + ANSWER_NO_SOONER_SECONDS - time.monotonic()))
    # The event id, never the reference: a log line must not say which reference was guessed.
    event_id = str(found.event.event_id) if found else None
    log.info(
        "informant_reference_tried",
        outcome=outcome.value,
        event_id=event_id,
        agent=agent.username if agent else None,
    )
    if outcome is Outcome.WRONG:
        return _reference_form(400, [wrong_answer()], form, agent)
    if outcome is Outcome.LOCKED:
        return message(
            403,
            _("This reference is locked"),
            _("It was tried too many times with a date of birth that is not the one registered."),
            _(
                "To keep the family's information safe, it cannot be used until the register office that gave"
                " it to you unlocks it. Contact them, and have the letter from the registrar with you."
            ),
        )
    if outcome is Outcome.EXPIRED:
        days = service.settings.informant_reference_days
        return message(
            410,
            _("This reference has expired"),
            _("A reference can be used for %(days)s days after the registration.") % {"days": days},
            _("To tell an organisation now, contact it directly, or ask the register office for help."),
        )
    assert found is not None
    earlier = request.cookies.get(service.cookies.informant)
    if earlier:
        await INFORMANT_SESSIONS.end(service.pool, token_hash(earlier))
    await INFORMANT_SESSIONS.forget_expired(service.pool, service.settings)
    token, _hash, _csrf = await INFORMANT_SESSIONS.start(
        service.pool, lambda _: (found.event.reference, agent.username if agent else None)
    )
    response = redirect(OVERVIEW_PATH)
    service.cookies.set(response, service.cookies.informant, token)
    return response


async def _session(request: Request, service: JourneyService) -> InformantSession | Expired | None:
    token = request.cookies.get(service.cookies.informant, "")
    if not token:
        return None
    return await INFORMANT_SESSIONS.find(service.pool, service.sealer, token, service.settings)


SESSION_ENDED = (
    N_("Your session has ended"),
    N_("For your security, enter the reference again after a while without using the service."),
)


async def _opened(
    request: Request, service: JourneyService
) -> tuple[InformantSession, StoredEvent] | Response:
    """The informant's session and the registration it opens, or the page saying why not."""
    found_session = await _session(request, service)
    if isinstance(found_session, Expired):
        return message(
            401,
            *(_(line) for line in SESSION_ENDED),
            link=(INFORMANT_SIGN_IN_PATH, _("Enter the reference again")),
        )
    if found_session is None:
        return redirect(INFORMANT_SIGN_IN_PATH)
    if found_session.agent is not None:  # opened on the telephone: only while that agent is signed in
        agent = await agent_signed_in(request, service)
        if isinstance(agent, Response) or agent.username != found_session.agent:
            await INFORMANT_SESSIONS.end(service.pool, found_session.token_hash)
            return message(
                401,
                _("Sign in again as the agent who took this call"),
                _("The informant's answers were not sent."),
                link=(PHONE_JOURNEY_PATH, _("Start the call's journey again")),
            )
    found = await registration(service.pool, found_session.reference)
    if found is None or found.locked or found.expired(service.settings):
        await INFORMANT_SESSIONS.end(service.pool, found_session.token_hash)
        return message(
            410,
            _("This registration can no longer be opened here"),
            _("Contact the register office that gave you the reference."),
        )
    return found_session, found.event


@dataclass(frozen=True)
class Offer:
    """An organisation the informant may ask to tell, in their words."""

    agency: str
    agency_name: str
    told_words: list[str]  # what it would be told
    details: list[tuple[str, str]]  # (form field, words) of what the informant must give
    asked_at: datetime | None  # when it was asked already, through this journey


async def _offers(service: JourneyService, event: StoredEvent) -> tuple[list[Offer], dict[str, Any]]:
    body = await as_corrected(service.pool, service.sealer, event)
    asked = await requested_before(service.pool, event)
    offers = [
        Offer(
            s.agency,
            _(agency_name(s.agency)),
            data_tracker.field_words(sorted(s.fields - set(SERVICE_DETAILS) - {"requested_event_type"})),
            [(d, _(DETAIL_NAMES[d])) for d in s.details],
            asked.get(s.agency),
        )
        for s in await services(service.pool, event, body, datetime.now(UTC))
    ]
    return offers, body


@router.get(OVERVIEW_PATH)
async def overview(request: Request, service: Journey) -> Response:
    opened = await _opened(request, service)
    if isinstance(opened, Response):
        return opened
    found_session, event = opened
    status = await event_status(service.pool, event.reference)
    told = [data_tracker.delivery(row) for row in (status or {}).get("agencies", [])]
    for asked in await requests_following(service.pool, event.event_id):
        # Of a request, only who was sent it: the others were not asked.
        status = await event_status(service.pool, asked.reference)
        told += [d for row in (status or {}).get("agencies", []) if (d := data_tracker.delivery(row)).told]
    # An organisation told of both the registration and a request shows each answer.
    told.sort(key=lambda d: (not d.told, d.agency_name))
    offers, _body = await _offers(service, event)
    return render(
        "informant_registration.html",
        title=_(REGISTERED_TITLES[event.event_type]),
        reference=event.reference,
        expires=(event.recorded_at + timedelta(days=service.settings.informant_reference_days)).date(),
        told=told,
        offers=offers,
        signOut=_sign_out(found_session),
    )


# Choosing organisations, the details each needs, and the permission to give them.


@dataclass(frozen=True)
class Answers:
    agencies: list[str]
    details: dict[str, str]
    permission: bool
    email: str = ""  # where to send the confirmations, if anywhere

    @property
    def hidden(self) -> list[tuple[str, str]]:
        """The answers as hidden form fields, carried to the check page and back."""
        fields = [("agencies", agency) for agency in self.agencies]
        fields += [(name, value) for name, value in self.details.items() if value]
        fields += [("email", self.email)] if self.email else []
        return fields + ([("permission", "yes")] if self.permission else [])


async def read_answers(request: Request) -> tuple[Answers, str | None]:
    """What the form says, each value cut to a size no right answer exceeds; and its CSRF token."""
    form = await request.form()
    agencies = [a[:50] for a in form.getlist("agencies")[:20] if isinstance(a, str)]
    details = {
        name: as_printed(value[:100])
        for name in SERVICE_DETAILS
        if isinstance(value := form.get(name, ""), str) and value.strip()
    }
    token = form.get("csrf_token")
    permission = form.get("permission") == "yes"
    email = form.get("email", "")
    email = email[: emails.MAX_ADDRESS + 1].strip() if isinstance(email, str) else ""
    return Answers(agencies, details, permission, email), token if isinstance(token, str) else None


def answer_problems(
    answers: Answers, offers: list[Offer], body: dict[str, Any], event: StoredEvent
) -> list[FieldError]:
    """The request's problems (``request_problems``) and the permission, by form field;
    an organisation asked before is not offered again."""
    still_open = {
        o.agency: Service(o.agency, frozenset(d for d, _ in o.details)) for o in offers if o.asked_at is None
    }
    errors = []
    for problem in request_problems(
        answers.agencies, answers.details, still_open, body[PERSON_REGISTERED[event.event_type]]
    ):
        field = problem["field"]
        if field.startswith("agencies."):  # not one offered: whatever was sent, the list is the answer
            errors.append(FieldError("agencies", _("Choose the organisations to tell from the list")))
        elif field == "agencies":
            errors.append(FieldError("agencies", _(problem["message"])))
        else:
            errors.append(FieldError(field.removeprefix("details."), _(problem["message"])))
    if answers.email and (wrong_address := emails.address_problem(answers.email)):
        errors.append(FieldError("email", wrong_address))
    if not answers.permission:
        errors.append(
            FieldError("permission", _("Confirm that you have permission to give these details, to continue"))
        )
    unique = {e.field: e for e in reversed(errors)}  # the first message for each field
    return [unique[f] for f in dict.fromkeys(e.field for e in errors)]


def _services_form(
    status_code: int,
    session: InformantSession,
    offers: list[Offer],
    answers: Answers,
    errors: list[FieldError],
    email_offered: bool,
) -> Response:
    return render(
        "informant_services.html",
        status_code,
        title=_("Which organisations do you want to tell?"),
        back=OVERVIEW_PATH,
        offers=[o for o in offers if o.asked_at is None],
        answers=answers,
        errors=errors,
        emailOffered=email_offered,
        csrfToken=session.csrf_token,
        signOut=_sign_out(session),
    )


@router.get(SERVICES_PATH)
async def services_form(request: Request, service: Journey) -> Response:
    opened = await _opened(request, service)
    if isinstance(opened, Response):
        return opened
    session, event = opened
    offers, _body = await _offers(service, event)
    if not any(o.asked_at is None for o in offers):
        return message(
            200,
            _("There are no more organisations to tell"),
            _("Every organisation that can be told of this registration with your agreement has been asked."),
            link=(OVERVIEW_PATH, _("See who has been told")),
        )
    return _services_form(200, session, offers, Answers([], {}, False), [], _email_offered(service))


@dataclass(frozen=True)
class Answered:
    """A posted form of the journey's: whose session, about which registration, saying what."""

    session: InformantSession
    event: StoredEvent
    answers: Answers
    offers: list[Offer]
    body: dict[str, Any]  # the registration as corrected
    email_offered: bool

    @property
    def chosen(self) -> list[Offer]:
        return [o for o in self.offers if o.agency in self.answers.agencies]

    def problems(self) -> list[FieldError]:
        return answer_problems(self.answers, self.offers, self.body, self.event)

    def form_again(self, status_code: int, errors: list[FieldError]) -> Response:
        return _services_form(
            status_code, self.session, self.offers, self.answers, errors, self.email_offered
        )


async def _answered(request: Request, service: JourneyService) -> Answered | Response:
    """The posted answers, in an open session and with its CSRF token; or the page saying why not."""
    opened = await _opened(request, service)
    if isinstance(opened, Response):
        return opened
    session, event = opened
    answers, token = await read_answers(request)
    if not same_secret(session.csrf_token, token):
        return message(
            403,
            _("Your answers were not sent"),
            _("Go back, and try again."),
            link=(SERVICES_PATH, _("Try again")),
        )
    offers, body = await _offers(service, event)
    if not _email_offered(service):
        answers = dataclasses.replace(answers, email="")
    return Answered(session, event, answers, offers, body, _email_offered(service))


def _email_offered(service: JourneyService) -> bool:
    return service.settings.smtp_host is not None


@router.post(SERVICES_PATH)
async def check_answers(request: Request, service: Journey) -> Response:
    answered = await _answered(request, service)
    if isinstance(answered, Response):
        return answered
    if (await request.form()).get("change") == "yes":  # "Change" on the check page: the form again
        return answered.form_again(200, [])
    errors = answered.problems()
    if errors:
        return answered.form_again(400, errors)
    session, answers, chosen = answered.session, answered.answers, answered.chosen
    return render(
        "informant_check.html",
        title=_("Check your answers before telling these organisations"),
        back=SERVICES_PATH,
        chosen=chosen,
        answers=answers,
        csrfToken=session.csrf_token,
        signOut=_sign_out(session),
    )


@router.post(CONFIRM_PATH)
async def confirm(request: Request, service: Journey) -> Response:
    answered = await _answered(request, service)
    if isinstance(answered, Response):
        return answered
    session, event, answers = answered.session, answered.event, answered.answers
    # The same answers sent twice in this session (a double click, a refresh) are one request.
    fingerprint = hashlib.sha256(
        json.dumps([session.token_hash.hex(), sorted(answers.agencies), answers.details]).encode()
    ).hexdigest()
    earlier = await service.pool.fetchrow(
        "SELECT event_id, reference FROM intake_record WHERE idempotency_key = $1",
        f"{ONLINE_OFFICE}:informant:{fingerprint}",
    )
    if earlier is not None:
        if answers.email and emails.address_problem(answers.email) is None:
            await emails.remember(service.pool, service.sealer, earlier["event_id"], answers.email)
        return _requested(session, earlier["reference"], answered)
    errors = answered.problems()
    if errors:
        return answered.form_again(400, errors)
    try:
        recorded = await service.request_services(
            event.reference,
            answers.agencies,
            answers.details,
            channel="phone" if session.agent else "online",
            recorded_by=f"agent:{session.agent}" if session.agent else "informant:online",
            idempotency_key=f"informant:{fingerprint}",
        )
    except RequestRefused as refused:  # the organisations offered changed in the meantime
        log.info("informant_request_refused", event_id=str(event.event_id), problems=len(refused.errors))
        again = await _answered(request, service)
        return again if isinstance(again, Response) else again.form_again(400, again.problems())
    log.info("informant_request_recorded", event_id=str(event.event_id), request_id=str(recorded.event_id))
    if answers.email:
        await emails.remember(service.pool, service.sealer, recorded.event_id, answers.email)
    return _requested(session, recorded.reference, answered)


def _requested(session: InformantSession, request_reference: str, answered: Answered) -> Response:
    return render(
        "informant_requested.html",
        title=_("Your request has been sent"),
        request_reference=request_reference,
        chosen=answered.chosen,
        emailed=bool(answered.answers.email),
        overview=OVERVIEW_PATH,
        signOut=_sign_out(session),
    )


def _sign_out(session: InformantSession) -> dict[str, str]:
    return {"action": "/tell-us-once/sign-out", "csrfToken": session.csrf_token}


@router.post("/tell-us-once/sign-out")
async def sign_out(request: Request, service: Journey) -> Response:
    found = await _session(request, service)
    if isinstance(found, InformantSession):
        given = (await request.form()).get("csrf_token")
        if not same_secret(found.csrf_token, given if isinstance(given, str) else None):
            return message(403, _("Sign-out not confirmed"), _("Try again."))
        await INFORMANT_SESSIONS.end(service.pool, found.token_hash)
    if isinstance(found, InformantSession) and found.agent is not None:  # a call has ended
        response = message(
            200, _("The call's journey has ended"), link=(PHONE_JOURNEY_PATH, _("Take the next call"))
        )
    else:
        response = message(200, _("You have signed out"), link=(START_PATH, _("Start again")))
    service.cookies.clear(response, service.cookies.informant)
    return response


def install_informant_journey(
    app: FastAPI, settings: Settings, pool: asyncpg.Pool, request_services: RequestServices
) -> None:
    """Mount the informant's journey on ``app``; ``request_services`` records what they ask."""
    app.state.informant_journey = JourneyService(
        settings,
        pool,
        PayloadSealer.from_settings(settings),
        CookiePolicy(settings.session_cookie_secure),
        request_services,
    )
    app.add_middleware(LanguageChoice, prefix=START_PATH)
    app.include_router(router)
