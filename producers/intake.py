"""The intake service: the JSON API for other systems, the registrars' HTML
forms, the schema registry and the office key registry, in one FastAPI app.

API clients authenticate with a bearer token bound to a registration office,
and see only their office's events; ``/metrics`` needs a monitoring token.
Errors are RFC 9457 problem details. Nothing is written unless the whole
request is valid (see ``producers.accept``). Every response carries the
security headers (``runtime.web.security_headers``), and every client has a
request allowance (``runtime.web.rate_limit``).

The API's handlers are named functions on the module-level router ``api``
(the pages' are on ``producers.web.routes.pages``); ``create_app`` only
assembles: the app's state, error handlers, routers and middleware.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any

import asyncpg
import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Scope

from producers import accounts
from producers.accept import (
    CorrectionRequest,
    Intake,
    NoSuchEvent,
    NotPermitted,
    SubmissionRejected,
    VoidRequest,
)
from producers.accounts import Submitter, TokenHolder
from producers.api_docs import install_api_docs
from producers.dependencies import RunningIntake
from producers.duplicates import DuplicateRegistration
from producers.key_registry import key_registry_router
from producers.requests import AddressChange, BirthRegistration, DeathRegistration, Submission
from producers.store import (
    IdempotencyConflict,
    Recorded,
    consent_receipts_for_event,
    duplicate_override,
)
from producers.web import install_web, too_many_requests_page, unavailable_page, wants_html
from router.consent_receipts import ConsentReceiptIssuer, consent_receipt_keys_router, consent_signer_within
from router.looks import refused_other_office
from router.store import event_status
from runtime.database import open_pool
from runtime.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runtime.metrics import receipt_metrics
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from runtime.web.problems import PROBLEM, BodySizeLimit, problem
from runtime.web.rate_limit import KnownClients, RateLimiter, Throttle, identify
from runtime.web.security_headers import SecurityHeaders
from runtime.web.sessions import CookiePolicy
from schemas.registry_api import registry_router
from schemas.validation import is_reference

log = structlog.get_logger(__name__)


def invalid(errors: list[dict[str, str]]) -> JSONResponse:
    """422 naming every bad field, with a one-line summary for people reading logs."""
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "The submission is not valid", summary, errors=errors)


def _field_path(location: tuple[Any, ...]) -> str:
    if location[:1] == ("header",):
        return "-".join(word.capitalize() for word in str(location[-1]).split("-"))
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) if parts else "(request body)"


def _validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        if error["type"] == "json_invalid":
            errors.append({"field": "(request body)", "message": "is not valid JSON"})
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        errors.append({"field": _field_path(tuple(error["loc"])), "message": message})
    return invalid(errors)


def _http_problem(exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (``{"detail": …}``) as problem details, like every other error."""
    if isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI reads a JSON body as UTF-8 and says only "There was an error parsing the body".
        response = problem(
            400,
            "The request body is not valid UTF-8",
            "Send the request body as JSON encoded in UTF-8.",
            errors=[{"field": "(request body)", "message": "is not valid UTF-8"}],
        )
    else:
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        response = problem(exc.status_code, title, str(exc.detail))
    response.headers.update(exc.headers or {})  # 405's Allow, say
    return response


class JsonOnly:
    """Refuse API writes whose body is not JSON with 415, before anything reads them."""

    def __init__(self, app: Callable[..., Awaitable[None]], prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            if scope["path"].startswith(self.prefix):
                headers = dict(scope["headers"])
                content_type = headers.get(b"content-type", b"").decode("latin-1")
                media_type = content_type.split(";")[0].strip().lower()
                empty = not content_type and headers.get(b"content-length", b"0") == b"0"
                # An empty body is left to the app: it answers 422 "body required".
                if not empty and media_type != "application/json" and not media_type.endswith("+json"):
                    response = problem(
                        415,
                        "Unsupported content type",
                        "Send the request body as JSON with Content-Type: application/json.",
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class Unauthenticated(Exception):
    pass


_bearer = HTTPBearer(auto_error=False, description="A token from `tuo tokens issue`, bound to one office.")
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        description="Repeat a request with the same key to get the same event and reference number.",
    ),
]


async def token_client(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    intake: RunningIntake,
) -> TokenHolder:
    """The system presenting a current bearer token, whatever its role."""
    if credentials is None:
        raise Unauthenticated
    holder = await intake.tokens.holder(credentials.credentials)
    identify(request, "token", holder.client if holder is not None else None)
    if holder is None:
        raise Unauthenticated
    return holder


async def api_client(holder: Annotated[TokenHolder, Depends(token_client)]) -> Submitter:
    """The API client presenting a current token that may submit and look up events."""
    submitter = holder.submitter()
    if submitter is None:
        raise NotPermitted("a monitoring token may only read /metrics")
    return submitter


async def monitoring_client(holder: Annotated[TokenHolder, Depends(token_client)]) -> TokenHolder:
    """A monitoring system: the only token that may read the metrics (an office's
    systems have no business with every agency's figures)."""
    if holder.role != "monitoring":
        raise NotPermitted("reading metrics needs a monitoring token (tuo tokens issue --role monitoring)")
    return holder


Client = Annotated[Submitter, Depends(api_client)]
Monitor = Annotated[TokenHolder, Depends(monitoring_client)]


class IntakeApp(FastAPI):
    """The FastAPI app with its whole middleware stack, error responses included,
    wrapped in the security headers."""

    def __init__(self, *, https: bool, **options: Any) -> None:
        self.https = https
        super().__init__(**options)

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), https=self.https)


def too_many_requests(scope: Scope, retry_after: int) -> Response:
    """429 with Retry-After: a page for a browser, problem details for the API."""
    path = str(scope.get("path", ""))
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    response: Response
    if wants_html(path, accept):
        response = too_many_requests_page(path, retry_after)
    else:
        response = problem(
            429, "Too many requests", f"This client has sent too many requests; try again in {retry_after} s."
        )
    response.headers["Retry-After"] = str(retry_after)
    return response


DATABASE_UNREACHABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
DATABASE_RETRY_AFTER_SECONDS = 5


async def _database_unreachable(request: Request, exc: Exception) -> Response:
    log.warning("database_unreachable", path=request.url.path, error=type(exc).__name__)
    retry = DATABASE_RETRY_AFTER_SECONDS
    response: Response
    if wants_html(request.url.path, request.headers.get("accept", "")):
        response = unavailable_page(retry)
    else:
        response = problem(
            503,
            "Temporarily unavailable",
            f"The service cannot reach its database just now; try again in {retry} s."
            " Send the same Idempotency-Key: an event is recorded once, however often it is sent.",
        )
    response.headers["Retry-After"] = str(retry)
    return response


# Error responses: problem details for API clients (a page for a browser where
# ``producers.web`` says it is one), registered on the app by ``create_app``.


async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_problem(exc)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if wants_html(request.url.path, request.headers.get("accept", "")):
        return await http_exception_handler(request, exc)
    return _http_problem(exc)


async def on_unauthenticated(_: Request, __: Unauthenticated) -> JSONResponse:
    response = problem(401, "Sign-in required", "Send a current API token: Authorization: Bearer <token>.")
    response.headers["WWW-Authenticate"] = 'Bearer realm="tuo-intake"'
    return response


async def on_rejected(_: Request, exc: SubmissionRejected) -> JSONResponse:
    return invalid(exc.errors)


async def on_not_permitted(_: Request, exc: NotPermitted) -> JSONResponse:
    return problem(403, "Not permitted", str(exc))


async def on_no_such_event(_: Request, __: NoSuchEvent) -> JSONResponse:
    return _no_such_event()


async def on_conflict(_: Request, __: IdempotencyConflict) -> JSONResponse:
    return problem(
        409,
        "Idempotency-Key already used",
        "This Idempotency-Key was used for a different request; use a new key for a new event.",
    )


async def on_duplicate(_: Request, exc: DuplicateRegistration) -> JSONResponse:
    return already_registered(exc)


PROBLEM_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    RequestValidationError: on_invalid,
    StarletteHTTPException: on_http_error,
    Unauthenticated: on_unauthenticated,
    SubmissionRejected: on_rejected,
    NotPermitted: on_not_permitted,
    NoSuchEvent: on_no_such_event,
    # PostgreSQL restarting or out of reach: a 503 with Retry-After, not a 500, so that
    # clients (and a registrar's browser) know to send the same request again.
    **dict.fromkeys(DATABASE_UNREACHABLE, _database_unreachable),
    IdempotencyConflict: on_conflict,
    DuplicateRegistration: on_duplicate,
}


def create_app(
    settings: Settings, pool: asyncpg.Pool | None = None, also: Iterable[Callable[[FastAPI], None]] = ()
) -> FastAPI:
    """The intake service: the API and the registrars' pages. ``also`` installs further
    parts of the one web service (the citizens' pages) before the pages' catch-all
    mounts; ``operators.web`` composes them."""
    PayloadSealer.from_settings(settings)  # no data key, no intake: refuse at start, not per request
    settings.require_pseudonym_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = pool is None
        app.state.intake = Intake(
            settings,
            pool if pool is not None else await open_pool(settings),
            # The informant's consents at the desk get receipts, signed with the event's transaction.
            receipts=ConsentReceiptIssuer(settings),
            consent_signer=consent_signer_within,
        )
        await app.state.intake.notices.listen()
        # Before the first sign-in, so that an unknown username's first try is no slower than any other.
        await asyncio.to_thread(accounts.dummy_password_hash)
        try:
            yield
        finally:
            await app.state.intake.group_commit.close()
            await app.state.intake.notices.close()
            if owned:
                await app.state.intake.pool.close()

    app = IntakeApp(
        # HSTS only where cookies are Secure, i.e. the service is reached over HTTPS.
        https=settings.session_cookie_secure,
        title="Tell Us Once intake",
        version="0.2.0",
        description="Record a life event once; every entitled agency is told.",
        lifespan=lifespan,
        docs_url=None,  # served by producers.api_docs, from this service alone
        redoc_url=None,  # ReDoc came from a CDN too; /docs is the one documentation page
    )
    for kind, handler in PROBLEM_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(api)
    install_api_docs(app, settings)  # before install_web mounts /assets as a whole
    app.include_router(registry_router())
    app.include_router(key_registry_router(lambda: app.state.intake.pool))
    app.include_router(consent_receipt_keys_router(lambda: app.state.intake.pool))
    for install in also:
        install(app)
    install_web(app, settings)
    app.add_middleware(JsonOnly)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    app.add_middleware(
        Throttle,  # outermost: a refused request is not read
        requests=RateLimiter(settings.http_rate_limit_per_minute),
        systems=RateLimiter(settings.api_rate_limit_per_minute),
        sign_ins=RateLimiter(settings.sign_in_attempts_per_minute),
        clients=KnownClients(),
        session_cookie=CookiePolicy(settings.session_cookie_secure).session,
        refuse=too_many_requests,
    )
    return app


_PROBLEM_SCHEMA = {"content": {PROBLEM: {"schema": {"type": "object"}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No or bad token", **_PROBLEM_SCHEMA},
    403: {"description": "Not permitted for this role", **_PROBLEM_SCHEMA},
    404: {"description": "No such event for this office", **_PROBLEM_SCHEMA},
    409: {
        "description": "Idempotency-Key reused for a different request; or the death or birth is already"
        " registered (`existing_reference` names it; a supervisor may send `duplicate_override`)",
        **_PROBLEM_SCHEMA,
    },
    413: {"description": "Body too large", **_PROBLEM_SCHEMA},
    415: {"description": "Body is not JSON", **_PROBLEM_SCHEMA},
    422: {"description": "Invalid request, each bad field named", **_PROBLEM_SCHEMA},
    429: {"description": "Too many requests from this client; see Retry-After", **_PROBLEM_SCHEMA},
    503: {
        "description": "The database is out of reach for a moment (a restart); send the same request"
        " again after Retry-After, with the same Idempotency-Key",
        **_PROBLEM_SCHEMA,
    },
}


# The JSON API for other systems: each handler reaches the running Intake through
# ``Depends`` (``producers.dependencies``), so the router works on any app that has one.
api = APIRouter()


@api.post("/v1/death-registrations", status_code=201, responses=_RESPONSES)
async def register_death(
    body: DeathRegistration, client: Client, intake: RunningIntake, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    return await _submit(intake, body, client, idempotency_key)


@api.post("/v1/birth-registrations", status_code=201, responses=_RESPONSES)
async def register_birth(
    body: BirthRegistration, client: Client, intake: RunningIntake, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    return await _submit(intake, body, client, idempotency_key)


@api.post("/v1/address-changes", status_code=201, responses=_RESPONSES)
async def change_address(
    body: AddressChange, client: Client, intake: RunningIntake, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    return await _submit(intake, body, client, idempotency_key)


@api.post("/v1/events/{reference}/corrections", status_code=201, responses=_RESPONSES)
async def correct(
    reference: str,
    body: CorrectionRequest,
    client: Client,
    intake: RunningIntake,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Correct fields of an event your office recorded; each recipient gets the changes it may see."""
    return _accepted(await intake.correct(_reference(reference), body, client, idempotency_key))


@api.post("/v1/events/{reference}/void", status_code=201, responses=_RESPONSES)
async def void(
    reference: str,
    body: VoidRequest,
    client: Client,
    intake: RunningIntake,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Void an event registered in error (supervisors only); every recipient is told."""
    return _accepted(await intake.void(_reference(reference), body, client, idempotency_key))


@api.get("/v1/events/{reference}", responses=_RESPONSES)
async def status(reference: str, client: Client, intake: RunningIntake) -> JSONResponse:
    """Where an event your office recorded has got to, agency by agency."""
    found = await event_status(intake.pool, _reference(reference), office=client.office)
    if found is None:
        await refused_other_office(intake.pool, _reference(reference), client.office, client.recorded_by)
        return _no_such_event()
    found["duplicate_override"] = await duplicate_override(intake.pool, found["reference"])
    return JSONResponse(found)


@api.get("/metrics", include_in_schema=False)
async def metrics(_: Monitor, intake: RunningIntake) -> Response:
    """Receipt figures per agency, for a monitoring system's token."""
    return Response(await receipt_metrics(intake.pool), media_type=METRICS_CONTENT_TYPE)


@api.get("/healthz")
async def health(intake: RunningIntake) -> dict[str, str]:
    await intake.pool.fetchval("SELECT 1")
    return {"status": "ok"}


async def _submit(intake: Intake, submission: Submission, client: Submitter, key: str | None) -> JSONResponse:
    recorded = await intake.accept(submission, client, key)
    # The informant's consent receipts, for the office's system to hand on to them.
    receipts = await consent_receipts_for_event(intake.pool, recorded.event_id) if submission.consents else []
    return _accepted(recorded, consent_receipts=receipts)


ALREADY_REGISTERED = "urn:tuo:problem:already-registered"


def already_registered(exc: DuplicateRegistration) -> JSONResponse:
    """409 naming the registration this one duplicates, and how a supervisor may override."""
    return problem(
        409,
        f"This {exc.what} is already registered",
        f"This {exc.what} is already registered as {exc.existing_reference} (recorded by the"
        f" {exc.existing_office} office); nothing was recorded. If it must be recorded again, a supervisor"
        ' can send it with "duplicate_override": {"existing_reference": "'
        + exc.existing_reference
        + '", "reason": "…"}.',
        type=ALREADY_REGISTERED,
        existing_reference=exc.existing_reference,
        existing_office=exc.existing_office,
    )


def _reference(reference: str) -> str:
    reference = reference.strip().upper()
    if not is_reference(reference):
        raise NoSuchEvent(reference)
    return reference


def _no_such_event() -> JSONResponse:
    return problem(404, "No such event", "Your office has recorded no event with that reference number.")


def _accepted(recorded: Recorded, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {
            "reference": recorded.reference,
            "event_id": str(recorded.event_id),
            "event_type": recorded.event_type,
            "status_url": f"/v1/events/{recorded.reference}",
            **extra,
        },
        status_code=201 if recorded.created else 200,
    )
