"""The registrars' pages: sign in, choose what to record, answer the questions,
choose which organisations to tell, check the answers, send, and see the
reference number and where each organisation has got to.

Every page needs a signed-in registrar; every form carries the session's CSRF
token. Draft answers live in the server-side session between steps. The
check-your-answers form carries a one-time submission id that is used as the
Idempotency-Key, so a double click or a resubmitted form gives one event and
the same reference number.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from producers.accept import Intake, NotPermitted, SubmissionRejected
from producers.accounts import Submitter, authenticate, registrar
from producers.dependencies import RunningIntake
from producers.duplicates import DuplicateRegistration
from producers.requests import DuplicateOverride
from producers.store import IdempotencyConflict, consent_receipts_for_event
from producers.web.forms import FORMS, FieldError, RegistrationForm
from router.looks import refused_other_office
from router.organisations import Organisation, agency_name, agency_statuses, organisations_to_tell
from router.registrations import requests_following, unlock_reference
from router.store import agencies as subscribing_agencies
from router.store import event_status, original_event
from runtime.local_authorities import local_authority
from runtime.web import sessions
from runtime.web.pages import redirect, render
from runtime.web.rate_limit import identify
from runtime.web.sessions import PHONE_JOURNEY_PATH, STAFF_SIGN_OUT_PATH, CookiePolicy, Expired, Session
from schemas.validation import as_printed, is_reference

log = structlog.get_logger(__name__)

# Where sign-in may send the registrar back to: this service's own pages only.
_RETURN_PATHS = re.compile(r"^/(start|register/[a-z]+(/[a-z]+)?|registrations/TUO-[0-9A-Z-]{14})$")
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
MAX_FORM_FIELDS = 300
MAX_USERNAME = 100
MAX_PASSWORD = 1024
MAX_OVERRIDE_REASON = 500  # as producers.requests.OverrideReason
_WHITESPACE = re.compile(r"\s+")

EVENT_HEADINGS = {
    "DeathRegistered": "Death registration recorded",
    "BirthRegistered": "Birth registration recorded",
    "AddressChanged": "Change of address recorded",
}
SIGN_IN_NOTICES = {
    "expired": "You were signed out because you had not used the service for a while. Sign in again.",
    "signed-out": "You have signed out.",
}


class SignInRequired(Exception):
    """No current session: send the browser to the sign-in page."""

    def __init__(self, return_to: str | None, expired: bool) -> None:
        super().__init__("sign-in required")
        self.return_to = return_to
        self.expired = expired


class AgentsTakeCalls(Exception):
    """A contact-centre agent's session: their pages are the telephone journey's."""


class FormNotTrusted(Exception):
    """A POST without this session's CSRF token: it may have been sent from another site."""


@dataclass(frozen=True)
class SignedIn:
    session: Session
    submitter: Submitter

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token


def _draft_key(form: RegistrationForm) -> str:
    return f"draft:{form.slug}"


def _sent_key(submission_id: str) -> str:
    return f"sent:{submission_id}"


def chosen_form(slug: str) -> RegistrationForm:
    """The form the path names; an unknown one is 404 (before sign-in is asked for)."""
    form = FORMS.get(slug)
    if form is None:
        raise HTTPException(404)
    return form


def _cross_site(request: Request) -> bool:
    """A browser says the form was sent from another site (older browsers say nothing,
    and the CSRF token still has to match)."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")


def return_path(value: str | None) -> str | None:
    return value if value and _RETURN_PATHS.match(value) else None


# The pages, and what they take from the app (``producers.dependencies``). The
# registrars' draft answers are sealed at rest with the intake's sealer.
pages = APIRouter(include_in_schema=False)


def cookie_policy(intake: RunningIntake) -> CookiePolicy:
    return CookiePolicy(intake.settings.session_cookie_secure)


Cookies = Annotated[CookiePolicy, Depends(cookie_policy)]
ChosenForm = Annotated[RegistrationForm, Depends(chosen_form)]


async def signed_in(request: Request, intake: RunningIntake, cookies: Cookies) -> SignedIn:
    """The registrar whose session the request carries; otherwise off to the sign-in page."""
    pool = intake.pool
    token = request.cookies.get(cookies.session)
    found = await sessions.find_session(pool, intake.sealer, token, intake.settings) if token else None
    return_to = return_path(request.url.path) if request.method == "GET" else None
    if found is None or isinstance(found, Expired):
        identify(request, "session", None)
        raise SignInRequired(return_to, expired=isinstance(found, Expired))
    submitter = await registrar(pool, found.username)
    identify(request, "session", submitter.recorded_by if submitter is not None else None)
    if submitter is None:  # disabled since signing in
        await sessions.end_session(pool, found.token_hash)
        raise SignInRequired(return_to, expired=False)
    if submitter.role == "agent":
        raise AgentsTakeCalls
    return SignedIn(found, submitter)


Registrar = Annotated[SignedIn, Depends(signed_in)]


async def posted(request: Request, csrf_token: str) -> dict[str, str]:
    """The form's fields, if it carries this session's CSRF token and came from this site."""
    form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    if _cross_site(request) or not sessions.same_secret(csrf_token, values.get("csrf_token")):
        raise FormNotTrusted
    return values


def page(template: str, who: SignedIn | None, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("csrf_token", who.csrf_token if who else None)
    return render(template, status_code, user=who.submitter if who else None, **context)


def details_page(
    who: SignedIn, form: RegistrationForm, answers: dict[str, str], errors: list[FieldError]
) -> Response:
    return page(
        "details.html",
        who,
        422 if errors else 200,
        form=form,
        answers=answers,
        errors=errors,
        error_for={e.name: e.message for e in errors if e.name},
        title=form.title,
        back="/start",
    )


# Signing in and out


@pages.get("/")
async def home() -> Response:
    return redirect("/start")


@pages.get("/sign-in")
async def sign_in_page(
    request: Request, cookies: Cookies, next: str | None = None, reason: str | None = None
) -> Response:
    token = request.cookies.get(cookies.sign_in) or sessions.new_secret()
    response = page(
        "sign_in.html",
        None,
        title="Sign in",
        csrf_token=token,
        next=return_path(next),
        notice=SIGN_IN_NOTICES.get(reason or ""),
        errors=[],
        username="",
    )
    cookies.set(response, cookies.sign_in, token)
    return response


@pages.post("/sign-in")
async def sign_in(request: Request, intake: RunningIntake, cookies: Cookies) -> Response:
    pool = intake.pool
    form = await request.form(max_files=0, max_fields=10)
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    token = request.cookies.get(cookies.sign_in)
    if token is None or _cross_site(request) or not sessions.same_secret(token, values.get("csrf_token")):
        raise FormNotTrusted
    username = values.get("username", "").strip()
    password = values.get("password", "")
    next_path = return_path(values.get("next"))
    errors = []
    if not username:
        errors.append(FieldError("Enter your username", None, "#username"))
    if not password:
        errors.append(FieldError("Enter your password", None, "#password"))
    status_code = 422
    if not errors and await sessions.sign_in_locked(pool, username):
        log.warning("web_sign_in_refused", reason="too many failures")
        errors.append(
            FieldError(
                "You have tried to sign in too many times. Wait 15 minutes, then try again.",
                None,
                "#username",
            )
        )
        status_code = 429
    submitter = None
    if not errors:
        if len(username) <= MAX_USERNAME and len(password) <= MAX_PASSWORD:
            submitter = await authenticate(pool, username, password)
        if submitter is None:
            await sessions.record_sign_in_failure(pool, username)
            log.info("web_sign_in_failed")  # not the username: people type passwords there
            # The same message whichever was wrong, so it does not tell anyone which usernames exist.
            errors.append(FieldError("Enter a correct username and password", None, "#username"))
    if submitter is None:
        response = page(
            "sign_in.html",
            None,
            status_code,
            title="Sign in",
            csrf_token=token,
            next=next_path,
            notice=None,
            errors=errors,
            username=username[:MAX_USERNAME],
            username_error=next((e.message for e in errors if e.href == "#username"), None),
            password_error=next((e.message for e in errors if e.href == "#password"), None),
        )
        return response
    await sessions.clear_sign_in_failures(pool, username)
    await sessions.forget_expired_sessions(pool, intake.settings)
    earlier = request.cookies.get(cookies.session)
    if earlier:
        await sessions.end_session_for_token(pool, earlier)
    new_token, _ = await sessions.start_session(pool, submitter.recorded_by.removeprefix("registrar:"))
    log.info("web_signed_in", recorded_by=submitter.recorded_by, office=submitter.office)
    response = redirect(PHONE_JOURNEY_PATH if submitter.role == "agent" else next_path or "/start")
    cookies.set(response, cookies.session, new_token)
    cookies.clear(response, cookies.sign_in)
    return response


@pages.post(STAFF_SIGN_OUT_PATH)
async def sign_out(request: Request, intake: RunningIntake, cookies: Cookies) -> Response:
    token = request.cookies.get(cookies.session)
    found = await sessions.find_session(intake.pool, intake.sealer, token, intake.settings) if token else None
    if isinstance(found, Session):
        await posted(request, found.csrf_token)
        await sessions.end_session(intake.pool, found.token_hash)
    response = redirect("/sign-in?reason=signed-out")
    cookies.clear(response, cookies.session)
    return response


# Choosing what to record


@pages.get("/start")
async def start_page(who: Registrar) -> Response:
    return page("start.html", who, title="What do you want to record?", forms=FORMS.values(), errors=[])


@pages.post("/start")
async def start(request: Request, who: Registrar) -> Response:
    values = await posted(request, who.csrf_token)
    form = FORMS.get(values.get("event", ""))
    if form is None:
        errors = [FieldError("Select what you want to record", None, "#event")]
        return page(
            "start.html",
            who,
            422,
            title="What do you want to record?",
            forms=FORMS.values(),
            errors=errors,
        )
    return redirect(form.href())


# The questions


@pages.get("/register/{slug}")
async def details(form: ChosenForm, who: Registrar) -> Response:
    draft = who.session.data.get(_draft_key(form)) or {}
    return details_page(who, form, draft.get("answers") or form.defaults(who.submitter), [])


@pages.post("/register/{slug}")
async def save_details(request: Request, form: ChosenForm, who: Registrar, intake: RunningIntake) -> Response:
    answers = form.answers_from(await posted(request, who.csrf_token))
    submission, errors = form.check(answers)
    if submission is None:
        return details_page(who, form, answers, errors)
    answers = form.as_recorded(answers, submission)
    earlier = who.session.data.get(_draft_key(form)) or {}
    consents = earlier.get("consents")
    # A changed draft is a new submission: it gets a new id (and so a new Idempotency-Key).
    draft = {"answers": answers, "consents": consents, "submission_id": sessions.new_secret()}
    await sessions.remember(intake.pool, intake.sealer, who.session, _draft_key(form), draft)
    return redirect(f"{form.href()}/check" if consents is not None else f"{form.href()}/organisations")


# Which organisations to tell


async def draft_and_choices(
    intake: Intake, who: SignedIn, form: RegistrationForm
) -> tuple[dict[str, Any] | None, list[Organisation]]:
    draft = who.session.data.get(_draft_key(form))
    if not draft or not draft.get("answers"):
        return None, []
    postcodes = form.postcodes(draft["answers"])
    return draft, await organisations_to_tell(intake.pool, form.event_type, postcodes)


def organisations_page(
    who: SignedIn,
    form: RegistrationForm,
    organisations: list[Organisation],
    choices: dict[str, str],
    errors: list[FieldError],
) -> Response:
    answers = (who.session.data.get(_draft_key(form)) or {}).get("answers") or {}
    return page(
        "organisations.html",
        who,
        422 if errors else 200,
        form=form,
        title="Which organisations should we tell?",
        # Postcodes the directory cannot place in a council: no council will be told.
        unplaced=sorted(p for p in form.postcodes(answers) if local_authority(p) is None),
        told=[o for o in organisations if o.statutory],
        asked=[o for o in organisations if not o.statutory],
        choices=choices,
        errors=errors,
        error_for={e.href.removeprefix("#consent-"): e.message for e in errors},
        back=form.href(),
    )


@pages.get("/register/{slug}/organisations")
async def organisations(form: ChosenForm, who: Registrar, intake: RunningIntake) -> Response:
    draft, choices = await draft_and_choices(intake, who, form)
    if draft is None:
        return redirect(form.href())
    return organisations_page(who, form, choices, draft.get("consents") or {}, [])


@pages.post("/register/{slug}/organisations")
async def choose_organisations(
    request: Request, form: ChosenForm, who: Registrar, intake: RunningIntake
) -> Response:
    values = await posted(request, who.csrf_token)
    draft, choices = await draft_and_choices(intake, who, form)
    if draft is None:
        return redirect(form.href())
    consents: dict[str, str] = {}
    errors = []
    for organisation in choices:
        if organisation.statutory:
            continue
        choice = values.get(f"consent.{organisation.agency}")
        if choice in ("given", "refused"):
            consents[organisation.agency] = choice
        else:
            errors.append(
                FieldError(
                    f"Select yes if the informant agrees that we tell {organisation.name}",
                    None,
                    f"#consent-{organisation.agency}",
                )
            )
    if errors:
        return organisations_page(who, form, choices, consents, errors)
    draft = {**draft, "consents": consents, "submission_id": sessions.new_secret()}
    await sessions.remember(intake.pool, intake.sealer, who.session, _draft_key(form), draft)
    return redirect(f"{form.href()}/check")


# Check your answers, and send


async def ready_to_send(
    intake: Intake, who: SignedIn, form: RegistrationForm
) -> tuple[dict[str, Any], list[Organisation], dict[str, str]] | Response:
    draft, choices = await draft_and_choices(intake, who, form)
    if draft is None:
        return redirect(form.href())
    given = draft.get("consents")
    asked = [o.agency for o in choices if not o.statutory]
    if given is None or any(agency not in given for agency in asked):
        return redirect(f"{form.href()}/organisations")  # a choice is missing, or a new agency appeared
    return draft, choices, {a: c for a, c in given.items() if a in asked}


@pages.get("/register/{slug}/check")
async def check_answers(form: ChosenForm, who: Registrar, intake: RunningIntake) -> Response:
    ready = await ready_to_send(intake, who, form)
    if isinstance(ready, Response):
        return ready
    draft, choices, consents = ready
    _, errors = form.check(draft["answers"], consents)
    if errors:
        return details_page(who, form, draft["answers"], errors)
    return check_page(who, form, draft, choices, consents)


def check_page(
    who: SignedIn,
    form: RegistrationForm,
    draft: dict[str, Any],
    choices: list[Organisation],
    consents: dict[str, str],
    status_code: int = 200,
    errors: list[FieldError] | None = None,
    duplicate: DuplicateRegistration | None = None,
    reason: str = "",
) -> Response:
    """The answers to check; after a refusal as a duplicate, the registration it
    duplicates and, for a supervisor, a way to record it anyway with a reason."""
    return page(
        "check.html",
        who,
        status_code,
        form=form,
        title="Check your answers before sending",
        summary=form.summary(draft["answers"]),
        organisations=choices,
        consents=consents,
        submission_id=draft["submission_id"],
        errors=errors or [],
        duplicate=duplicate,
        may_override=who.submitter.may_override_duplicates,
        reason=reason[:MAX_OVERRIDE_REASON],
        reason_error=next((e.message for e in errors or [] if e.href == "#override-reason"), None),
        back=f"{form.href()}/organisations",
    )


def duplicate_errors(who: SignedIn, duplicate: DuplicateRegistration) -> list[FieldError]:
    message = (
        f"This {duplicate.what} is already registered, reference number {duplicate.existing_reference}"
        f" (recorded by the {duplicate.existing_office} office). Nothing has been recorded."
    )
    if who.submitter.may_override_duplicates:
        return [FieldError(message + " To record it again, give the reason.", None, "#override-reason")]
    return [
        FieldError(message + " Ask a supervisor if it must be recorded again.", None, "#already-registered")
    ]


def only_a_supervisor(who: SignedIn, form: RegistrationForm) -> Response:
    return page(
        "message.html",
        who,
        403,
        title="Only a supervisor can record a registration again",
        lines=["Nothing has been recorded. Ask a supervisor to record it."],
        link=(f"{form.href()}/check", "Back to the answers"),
    )


@pages.post("/register/{slug}/check")
async def send(request: Request, form: ChosenForm, who: Registrar, intake: RunningIntake) -> Response:
    values = await posted(request, who.csrf_token)
    submission_id = values.get("submission_id", "")
    if not _SUBMISSION_ID.match(submission_id):
        raise FormNotTrusted
    sent = who.session.data.get(_sent_key(submission_id))
    if sent is not None:  # a second click, or the browser sending the form again
        return redirect(f"/registrations/{sent}")
    ready = await ready_to_send(intake, who, form)
    if isinstance(ready, Response):
        return ready
    draft, choices, consents = ready
    if draft["submission_id"] != submission_id:
        return page(
            "message.html",
            who,
            409,
            title="These answers have changed",
            lines=["The answers were changed after this page was shown. Check them again before sending."],
            link=(f"{form.href()}/check", "Check the answers"),
        )
    submission, errors = form.check(draft["answers"], consents)
    if submission is None:
        return details_page(who, form, draft["answers"], errors)
    overriding = "existing_reference" in values  # the supervisor's "record it again" form
    reason = _WHITESPACE.sub(" ", values.get("override_reason", "")).strip()
    if overriding:
        if not who.submitter.may_override_duplicates:
            return only_a_supervisor(who, form)
        try:
            override = DuplicateOverride(existing_reference=values["existing_reference"], reason=reason)
        except ValidationError as exc:
            duplicate = DuplicateRegistration(
                form.event_type, values["existing_reference"][:40], values.get("existing_office", "")[:40]
            )
            return check_page(
                who,
                form,
                draft,
                choices,
                consents,
                422,
                [_reason_error(exc)],
                duplicate=duplicate,
                reason=reason,
            )
        submission = submission.model_copy(update={"duplicate_override": override})
    try:
        recorded = await intake.accept(submission, who.submitter, f"web-{submission_id}")
    except DuplicateRegistration as exc:
        return check_page(who, form, draft, choices, consents, 409, duplicate_errors(who, exc), exc)
    except NotPermitted:
        return only_a_supervisor(who, form)
    except SubmissionRejected as exc:
        if any(e["field"].startswith("duplicate_override") for e in exc.errors):
            # The registration it duplicated was voided meanwhile, or another now stands in the way.
            changed = "; ".join(e["message"] for e in exc.errors)
            message = f"The registration to record over has changed: {changed}"
            return check_page(who, form, draft, choices, consents, 422, [FieldError(message, None, "#send")])
        return details_page(who, form, draft["answers"], form.errors_at(exc.errors))
    except IdempotencyConflict:
        return page(
            "message.html",
            who,
            409,
            title="This form was already used",
            lines=["These answers were sent before with different details. Start the registration again."],
            link=(form.href(), "Start again"),
        )
    await sessions.replace(
        intake.pool,
        intake.sealer,
        who.session,
        _draft_key(form),
        _sent_key(submission_id),
        recorded.reference,
    )
    return redirect(f"/registrations/{recorded.reference}")


# The reference number, and where each organisation has got to


async def statuses(intake: Intake, who: SignedIn, reference: str) -> dict[str, Any] | None:
    reference = reference.strip().upper()
    if not is_reference(reference):
        return None
    status = await event_status(intake.pool, reference, office=who.submitter.office)
    if status is None:
        await refused_other_office(intake.pool, reference, who.submitter.office, who.submitter.recorded_by)
        return None
    agencies = agency_statuses(status)
    # The router decides for every agency with any subscription; until all those
    # decisions are in, more rows may yet appear.
    decided = {row["agency"] for row in status["agencies"]}
    expected = set(await subscribing_agencies(intake.pool))
    return {
        "reference": status["reference"],
        "event_id": uuid.UUID(status["event_id"]),
        "heading": EVENT_HEADINGS.get(status["event_type"], "Event recorded"),
        # A birth's or a death's reference also opens the informant's journey (/tell-us-once).
        "informant_journey": intake.settings.informant_reference_days
        if status["event_type"] in ("BirthRegistered", "DeathRegistered")
        else None,
        "agencies": agencies,
        "settled": bool(decided) and expected <= decided and all(a.settled for a in agencies),
    }


async def consent_receipts(intake: Intake, found: dict[str, Any]) -> list[dict[str, str]]:
    """The informant's consent receipts for a registration, named for the page."""
    receipts = await consent_receipts_for_event(intake.pool, found["event_id"])
    return [{**r, "agency_name": agency_name(r["agency"])} for r in receipts]


async def informant_requests(intake: Intake, found: dict[str, Any]) -> list[dict[str, Any]]:
    """What the informant asked for since (online, or by phone), and where each
    organisation they chose has got to: those it was sent to only."""
    asked = []
    for request in await requests_following(intake.pool, found["event_id"]):
        status = await event_status(intake.pool, request.reference)
        sent = [row for row in (status or {}).get("agencies", []) if row["decision"] == "delivered"]
        asked.append(
            {
                "reference": request.reference,
                "on": request.recorded_at.date(),
                "by_phone": request.by_phone,
                "agencies": agency_statuses({"agencies": sent}),
            }
        )
    return asked


@pages.get("/registrations/{reference}")
async def confirmation(reference: str, who: Registrar, intake: RunningIntake) -> Response:
    found = await statuses(intake, who, reference)
    if found is None:
        raise HTTPException(404)
    receipts = await consent_receipts(intake, found)
    requests = await informant_requests(intake, found)
    return page(
        "confirmation.html",
        who,
        title=found["heading"],
        consent_receipts=receipts,
        informant_requests=requests,
        **found,
    )


# An informant's reference locked by wrong answers (the journey at /tell-us-once)

UNLOCK_PATH = "/informant-references/unlock"


def unlock_page(who: SignedIn, status_code: int, errors: list[FieldError], reference: str) -> Response:
    return page(
        "unlock.html",
        who,
        status_code,
        title="Unlock an informant’s reference",
        errors=errors,
        reference=reference,
    )


@pages.get(UNLOCK_PATH)
async def unlock_form(who: Registrar) -> Response:
    return unlock_page(who, 200, [], "")


@pages.post(UNLOCK_PATH)
async def unlock_informant_reference(request: Request, who: Registrar, intake: RunningIntake) -> Response:
    """The office that gave a reference, having checked who is asking, lets it be tried again."""
    values = await posted(request, who.csrf_token)
    reference = as_printed(values.get("reference", "")[:100])
    errors = []
    if not is_reference(reference):
        errors.append(
            FieldError(
                "Enter the reference as it is on the registrar’s letter, like TUO-2026-ABCD-1234",
                None,
                "#reference",
            )
        )
    if values.get("checked") != "yes":
        errors.append(FieldError("Confirm that you have checked who is asking", None, "#checked"))
    found = await original_event(intake.pool, reference) if not errors else None
    if not errors and (found is None or found.office != who.submitter.office):
        errors.append(FieldError("This is not a reference your office gave", None, "#reference"))
    if errors or found is None:
        return unlock_page(who, 422, errors, reference)
    unlocked = await unlock_reference(intake.pool, reference)
    log.info(
        "informant_reference_unlocked" if unlocked else "informant_reference_not_locked",
        event_id=str(found.event_id),
        by=who.submitter.recorded_by,
    )
    return page(
        "message.html",
        who,
        title="The reference can be used again" if unlocked else "This reference is not locked",
        lines=[
            f"The informant can use {reference} at /tell-us-once again."
            if unlocked
            else f"{reference} can be used at /tell-us-once: nothing needed unlocking."
        ],
        link=("/start", "Go to the start"),
    )


@pages.get("/registrations/{reference}/consent-receipts/{receipt_id}")
async def consent_receipt_download(
    reference: str, receipt_id: str, who: Registrar, intake: RunningIntake
) -> Response:
    """One of the informant's consent receipts, as a file to hand to them."""
    found = await statuses(intake, who, reference)
    receipts = await consent_receipts(intake, found) if found else []
    token = next((r["receipt"] for r in receipts if r["receipt_id"] == receipt_id.lower()), None)
    if token is None:
        raise HTTPException(404)
    return Response(
        token,
        media_type="application/jwt",
        headers={"Content-Disposition": f'attachment; filename="consent-receipt-{receipt_id.lower()}.jwt"'},
    )


@pages.get("/registrations/{reference}/agencies")
async def agencies(reference: str, who: Registrar, intake: RunningIntake) -> Response:
    """The status table alone, for the confirmation page's script to refresh."""
    found = await statuses(intake, who, reference)
    if found is None:
        raise HTTPException(404)
    return render("_agencies.html", **found)


def _reason_error(exc: ValidationError) -> FieldError:
    """The override's reason, in words (the reference is the page's own hidden field)."""
    for error in exc.errors():
        if error["loc"][:1] == ("reason",):
            if error["type"] == "string_too_short":
                message = "Enter the reason for recording it again (at least 3 characters)"
            elif error["type"] == "string_too_long":
                message = f"The reason must be {MAX_OVERRIDE_REASON} characters or fewer"
            else:
                message = "The reason must not contain control characters"
            return FieldError(message, None, "#override-reason")
    return FieldError(
        "The registration to record over is not valid: start again", None, "#already-registered"
    )
