"""The intake service's JSON API: validate, give a reference number, store the
event with its outbox row in one transaction, and report status per agency.

Errors are RFC 9457 problem details. Nothing is written unless the whole
submission is valid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import structlog
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from producers.requests import AddressChange, BirthRegistration, DeathRegistration, Submission
from producers.store import (
    IdempotencyConflict,
    NewEvent,
    consent_agencies,
    event_status,
    record_event,
)
from runtime.database import open_pool
from runtime.kafka import Topics
from runtime.settings import Settings
from schemas import encode, models
from schemas.cloudevents import headers_for
from schemas.registry_api import registry_router

log = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"
# Crockford base32 without I, L, O, U: unambiguous when read out over the phone.
_REFERENCE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


REFERENCE_PATTERN = re.compile(rf"^TUO-[0-9]{{4}}-[{_REFERENCE_ALPHABET}]{{4}}-[{_REFERENCE_ALPHABET}]{{4}}$")


def new_reference(now: datetime) -> str:
    chars = "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(8))
    return f"TUO-{now:%Y}-{chars[:4]}-{chars[4:]}"


def subject_id_for(person_nino: str | None, key: bytes) -> str:
    """Pseudonymous subject id: keyed hash of the NINO, or random when unknown."""
    if person_nino is None:
        return f"s-{uuid.uuid4().hex}"
    digest = hmac.new(key, person_nino.encode(), hashlib.sha256).hexdigest()
    return f"n-{digest[:32]}"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def invalid(errors: list[dict[str, str]]) -> JSONResponse:
    """422 naming every bad field, with a one-line summary for people reading logs."""
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "The submission is not valid", summary, errors=errors)


def _field_path(location: tuple[Any, ...]) -> str:
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


class BodySizeLimit:
    """Refuse request bodies over the limit with 413 before the app reads them."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # Read the whole (bounded) body first, so a chunked upload cannot slip past the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # a disconnect: let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        response = problem(
            413, "The submission is too large", f"Request bodies are limited to {self.limit} bytes."
        )
        await response(scope, receive, send)


def create_app(settings: Settings, pool: asyncpg.Pool | None = None) -> FastAPI:
    topics = Topics(settings.topic_prefix)
    pseudonym_key = settings.require_pseudonym_key()
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = pool is None
        state["pool"] = pool if pool is not None else await open_pool(settings)
        try:
            yield
        finally:
            if owned:
                await state["pool"].close()

    app = FastAPI(
        title="Tell Us Once intake",
        version="0.1.0",
        description="Record a life event once; every entitled agency is told.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_problem(exc)

    async def submit(submission: Submission, idempotency_key: str | None) -> JSONResponse:
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
            return invalid([{"field": "Idempotency-Key", "message": "must be 1 to 200 characters"}])
        db = state["pool"]
        allowed = await consent_agencies(db, submission.event_type)
        unknown = [c.agency for c in submission.consents if c.agency not in allowed]
        if unknown:
            errors = [
                {
                    "field": f"consents.{i}.agency",
                    "message": f"{c.agency} does not receive {submission.event_type} on consent",
                }
                for i, c in enumerate(submission.consents)
                if c.agency in unknown
            ]
            return invalid(errors)
        now = datetime.now(UTC)
        event_id = uuid.uuid4()
        reference = new_reference(now)
        subject = subject_id_for(submission.subject().nino, pseudonym_key)
        envelope = models.Envelope(
            event_id=event_id,
            reference=reference,
            occurred_at=submission.occurred_at(),
            recorded_at=now,
            subject=models.SubjectIdentifiers(subject_id=subject, nino=submission.subject().nino),
            informant=models.Informant(**submission.informant.model_dump()),
            channel=submission.channel.upper(),
            registration_office=submission.registration_office,
            provenance=models.Provenance(source_system="tuo-intake-api", recorded_by="api"),
        )
        value = encode(submission.event_type, submission.contract(envelope).avro())
        fingerprint = hashlib.sha256(
            json.dumps(submission.model_dump(mode="json"), sort_keys=True).encode()
            + submission.event_type.encode()
        ).hexdigest()
        try:
            recorded = await record_event(
                db,
                NewEvent(
                    reference=reference,
                    event_id=event_id,
                    event_type=submission.event_type,
                    subject_id=subject,
                    registration_office=submission.registration_office,
                    recorded_by="api",
                    recorded_at=now,
                    idempotency_key=idempotency_key,
                    request_fingerprint=fingerprint,
                    consents=[(c.agency, c.choice) for c in submission.consents],
                    topic=topics.life_events,
                    message_key=subject.encode(),
                    message_value=value,
                    headers=headers_for(
                        value,
                        id=str(event_id),
                        source="/offices/" + quote(submission.registration_office, safe=""),
                        subject=subject,
                        time=now,
                        schema_base_url=settings.schema_base_url(),
                    ),
                ),
            )
        except IdempotencyConflict:
            return problem(
                409,
                "Idempotency-Key already used",
                "This Idempotency-Key was used for a different submission; use a new key for a new event.",
            )
        log.info(
            "event_accepted",
            event_id=str(recorded.event_id),
            reference=recorded.reference,
            event_type=recorded.event_type,
            replayed=not recorded.created,
        )
        return JSONResponse(
            {
                "reference": recorded.reference,
                "event_id": str(recorded.event_id),
                "event_type": recorded.event_type,
                "status_url": f"/v1/events/{recorded.reference}",
            },
            status_code=201 if recorded.created else 200,
        )

    @app.post("/v1/death-registrations", status_code=201)
    async def register_death(
        body: DeathRegistration, idempotency_key: str | None = Header(default=None)
    ) -> JSONResponse:
        return await submit(body, idempotency_key)

    @app.post("/v1/birth-registrations", status_code=201)
    async def register_birth(
        body: BirthRegistration, idempotency_key: str | None = Header(default=None)
    ) -> JSONResponse:
        return await submit(body, idempotency_key)

    @app.post("/v1/address-changes", status_code=201)
    async def change_address(
        body: AddressChange, idempotency_key: str | None = Header(default=None)
    ) -> JSONResponse:
        return await submit(body, idempotency_key)

    @app.get("/v1/events/{reference}")
    async def status(reference: str) -> JSONResponse:
        reference = reference.strip().upper()
        if not REFERENCE_PATTERN.match(reference):
            return problem(404, "No such event", "No event has that reference number.")
        found = await event_status(state["pool"], reference)
        if found is None:
            return problem(404, "No such event", "No event has that reference number.")
        return JSONResponse(found)

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        await state["pool"].fetchval("SELECT 1")
        return {"status": "ok"}

    app.include_router(registry_router())
    app.add_middleware(BodySizeLimit, limit=settings.max_request_bytes)
    return app
