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

Choosing more organisations, the details each needs and the confirmation by email
are the next steps of this journey; they are not built yet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import Response

from citizens import data_tracker
from router.store import StoredEvent, event_status, original_event
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from runtime.web import pages
from runtime.web.pages import redirect
from runtime.web.rate_limit import INFORMANT_SIGN_IN_PATH
from runtime.web.sessions import CookiePolicy, Expired, SessionStore, same_secret, token_hash
from schemas.codec import decode
from schemas.validation import is_reference, today_in_the_uk

log = structlog.get_logger(__name__)

pages.add_templates(Path(__file__).parent / "templates")

START_PATH = "/tell-us-once"
OVERVIEW_PATH = "/tell-us-once/registration"
MAX_WRONG_ANSWERS = 5
# Whose date of birth the informant is asked for, by the kind of registration.
PERSON_REGISTERED = {"DeathRegistered": "deceased", "BirthRegistered": "child"}
REGISTERED_WHAT = {"DeathRegistered": "death", "BirthRegistered": "birth"}


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
    person = PERSON_REGISTERED[found.event.event_type]
    _, body = decode(sealer.open(found.event.value, found.event.event_id))
    born: date | None = (body.get(person) or {}).get("date_of_birth")
    corrections = await pool.fetch(
        "SELECT c.event_id, o.message_value FROM intake_record c"
        "  JOIN LATERAL (SELECT message_value FROM outbox WHERE event_id = c.event_id"
        "                 ORDER BY id LIMIT 1) o ON true"
        " WHERE c.follows_event_id = $1 AND c.event_type = 'EventCorrected'"
        " ORDER BY c.recorded_at, c.reference",
        found.event.event_id,
    )
    for correction in corrections:
        _, corrected = decode(sealer.open(bytes(correction["message_value"]), correction["event_id"]))
        for change in corrected.get("changes", []):
            if change["field"] == f"{person}.date_of_birth":
                born = date.fromisoformat(json.loads(change["new_value_json"]))
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


async def unlock(pool: asyncpg.Pool, reference: str) -> bool:
    """The register office vouches for the informant: the reference may be tried again."""
    result: str = await pool.execute("DELETE FROM informant_reference_lock WHERE reference = $1", reference)
    return result != "DELETE 0"


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


def _informant_session(row: asyncpg.Record, hashed: bytes, sealer: PayloadSealer) -> InformantSession:
    return InformantSession(hashed, row["reference"], row["csrf_token"])


INFORMANT_SESSIONS = SessionStore("informant_session", ("reference",), _informant_session)


# The form: what the informant typed, checked.


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    @property
    def href(self) -> str:
        return f"#{self.field}"


def normalised_reference(typed: str) -> str:
    """As printed on the registrar's letter, whatever the case and spacing typed."""
    return re.sub(r"\s+", "", typed).upper()


def read_answer(form: dict[str, str]) -> tuple[str, date | None, list[FieldError]]:
    errors: list[FieldError] = []
    reference = normalised_reference(form.get("reference", ""))
    if not reference:
        errors.append(FieldError("reference", "Enter the reference from the registrar"))
    elif not is_reference(reference):
        errors.append(
            FieldError(
                "reference", "Enter the reference as it is on the registrar's letter, like TUO-2026-ABCD-1234"
            )
        )
    parts = {name: form.get(f"born-{name}", "").strip() for name in ("day", "month", "year")}
    born: date | None = None
    missing = [name for name, value in parts.items() if not value]
    if len(missing) == 3:
        errors.append(FieldError("born-day", "Enter their date of birth"))
    elif missing:
        errors.append(FieldError(f"born-{missing[0]}", f"Date of birth must include a {missing[0]}"))
    elif not all(value.isdigit() for value in parts.values()) or len(parts["year"]) != 4:
        errors.append(FieldError("born-day", "Date of birth must be a real date, like 27 3 1950"))
    else:
        try:
            born = date(int(parts["year"]), int(parts["month"]), int(parts["day"]))
        except ValueError:
            errors.append(FieldError("born-day", "Date of birth must be a real date, like 27 3 1950"))
        else:
            if born > today_in_the_uk():
                errors.append(FieldError("born-day", "Date of birth must be in the past"))
                born = None
    return reference, born, errors


# The pages.


@dataclass(frozen=True)
class JourneyService:
    settings: Settings
    pool: asyncpg.Pool
    sealer: PayloadSealer
    cookies: CookiePolicy


def _service(request: Request) -> JourneyService:
    service: JourneyService = request.app.state.informant_journey
    return service


Service = Annotated[JourneyService, Depends(_service)]
router = APIRouter()


def render(template: str, status_code: int = 200, **context: Any) -> Response:
    return pages.render(template, status_code, homepageUrl=START_PATH, serviceUrl=START_PATH, **context)


def message(status_code: int, title: str, *lines: str, link: tuple[str, str] | None = None) -> Response:
    return render("informant_message.html", status_code, title=title, lines=list(lines), link=link)


@router.get(START_PATH)
async def start(service: Service) -> Response:
    days = service.settings.informant_reference_days
    return render("informant_start.html", title="Use the reference from the registrar", days=days)


WRONG_ANSWER = FieldError(
    "reference", "The reference or the date of birth is not right: check both against the registrar's letter"
)


def _reference_form(status_code: int, errors: list[FieldError], values: dict[str, str]) -> Response:
    return render(
        "informant_reference.html",
        status_code,
        title="Enter the reference",
        back=START_PATH,
        errors=errors,
        values=values,
    )


@router.get(INFORMANT_SIGN_IN_PATH)
async def reference_form() -> Response:
    return _reference_form(200, [], {})


@router.post(INFORMANT_SIGN_IN_PATH)
async def enter_reference(request: Request, service: Service) -> Response:
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
        return _reference_form(400, errors, form)
    outcome, found = await check_answer(service.pool, service.sealer, service.settings, reference, born)
    # The event id, never the reference: a log line must not say which reference was guessed.
    event_id = str(found.event.event_id) if found else None
    log.info("informant_reference_tried", outcome=outcome.value, event_id=event_id)
    if outcome is Outcome.WRONG:
        return _reference_form(400, [WRONG_ANSWER], form)
    if outcome is Outcome.LOCKED:
        return message(
            403,
            "This reference is locked",
            "It was tried too many times with a date of birth that is not the one registered.",
            "To keep the family's information safe, it cannot be used until the register office that gave it"
            " to you unlocks it. Contact them, and have the letter from the registrar with you.",
        )
    if outcome is Outcome.EXPIRED:
        days = service.settings.informant_reference_days
        return message(
            410,
            "This reference has expired",
            f"A reference can be used for {days} days after the registration.",
            "To tell an organisation now, contact it directly, or ask the register office for help.",
        )
    assert found is not None
    earlier = request.cookies.get(service.cookies.informant)
    if earlier:
        await INFORMANT_SESSIONS.end(service.pool, token_hash(earlier))
    await INFORMANT_SESSIONS.forget_expired(service.pool, service.settings)
    token, _, _ = await INFORMANT_SESSIONS.start(service.pool, lambda _: (found.event.reference,))
    response = redirect(OVERVIEW_PATH)
    service.cookies.set(response, service.cookies.informant, token)
    return response


async def _session(request: Request, service: JourneyService) -> InformantSession | Expired | None:
    token = request.cookies.get(service.cookies.informant, "")
    if not token:
        return None
    return await INFORMANT_SESSIONS.find(service.pool, service.sealer, token, service.settings)


@router.get(OVERVIEW_PATH)
async def overview(request: Request, service: Service) -> Response:
    found_session = await _session(request, service)
    if isinstance(found_session, Expired):
        return message(
            401,
            "Your session has ended",
            "For your security, enter the reference again after a while without using the service.",
            link=(INFORMANT_SIGN_IN_PATH, "Enter the reference again"),
        )
    if found_session is None:
        return redirect(INFORMANT_SIGN_IN_PATH)
    found = await registration(service.pool, found_session.reference)
    if found is None or found.locked or found.expired(service.settings):
        await INFORMANT_SESSIONS.end(service.pool, found_session.token_hash)
        return message(
            410,
            "This registration can no longer be opened here",
            "Contact the register office that gave you the reference.",
        )
    event = found.event
    status = await event_status(service.pool, event.reference)
    told = sorted(
        (data_tracker.delivery(row) for row in (status or {}).get("agencies", [])),
        key=lambda d: (not d.told, d.agency_name),
    )
    choosable = [
        setting
        for setting in await data_tracker.consent_settings(service.pool, event.subject_id, None)
        if setting.event_type == event.event_type and setting.changeable
    ]
    return render(
        "informant_registration.html",
        title=f"The {REGISTERED_WHAT[event.event_type]} you registered",
        reference=event.reference,
        expires=(event.recorded_at + timedelta(days=service.settings.informant_reference_days)).date(),
        told=told,
        choosable=choosable,
        signOut={"action": "/tell-us-once/sign-out", "csrfToken": found_session.csrf_token},
    )


@router.post("/tell-us-once/sign-out")
async def sign_out(request: Request, service: Service) -> Response:
    found = await _session(request, service)
    if isinstance(found, InformantSession):
        given = (await request.form()).get("csrf_token")
        if not same_secret(found.csrf_token, given if isinstance(given, str) else None):
            return message(403, "Sign-out not confirmed", "Try again.")
        await INFORMANT_SESSIONS.end(service.pool, found.token_hash)
    response = message(200, "You have signed out", link=(START_PATH, "Start again"))
    service.cookies.clear(response, service.cookies.informant)
    return response


def install_informant_journey(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
    """Mount the informant's journey on ``app``."""
    app.state.informant_journey = JourneyService(
        settings, pool, PayloadSealer.from_settings(settings), CookiePolicy(settings.session_cookie_secure)
    )
    app.include_router(router)
