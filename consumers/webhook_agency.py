"""A reference webhook agency: how an agency that cannot run Kafka receives its events.

``create_receiver`` is a small FastAPI service with one endpoint, ``POST /events``, that
the bus's webhook bridge (``consumers.webhooks``) calls. For each request it:

1. refuses a body over ``MAX_BODY`` bytes (413);
2. checks the Standard Webhooks signature with the ``standardwebhooks`` library, against
   each of the agency's secrets: a forged request, or one replayed more than five
   minutes later (a stale ``webhook-timestamp``), is refused (401);
3. checks, as the Kafka SDK does, that the CloudEvents headers hold and that every field
   delivered is signed by the registration office (``tuo-sig*`` headers, Ed25519, the
   office's key from the key registry), so the bus itself need not be trusted (422);
4. applies the event once, in its own inbox (``webhook-id`` is the event id: a repeat
   gets the first outcome back, marked duplicate), and answers 200 with the outcome.

Any answer but a 2xx makes the bridge try again later, so an event that fails a check
here is not lost: it ends in the bus's dead letters, flagged overdue, if it never passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka.structs import ConsumerRecord
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.sdk import (
    BatchHandler,
    Handler,
    Read,
    Record,
    apply_batch,
    as_batch_handler,
    checked_event,
    mark_receipted,
)
from consumers.webhooks.requests import AVRO, kafka_headers
from runtime.keyring import KeyRing
from schemas import UndecodableMessage
from schemas.signatures import SignatureRejected

MAX_BODY = 1024 * 1024


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


class _TooLarge(Exception):
    pass


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _verified(secrets: Sequence[str], body: bytes, headers: dict[str, str]) -> bool:
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
            return True
        except WebhookVerificationError:
            continue
    return False


def create_receiver(
    pool: asyncpg.Pool,
    agency: str,
    secrets: Sequence[str],
    handler: Handler | BatchHandler,
    *,
    keys: KeyRing,
    consent_keys: KeyRing,
) -> FastAPI:
    """The agency's webhook receiver. ``secrets``: the Standard Webhooks secrets it accepts
    (two while it rotates); ``keys``/``consent_keys``: where the offices' and the consent
    service's public keys come from (``KeyRing.over_http`` for an agency elsewhere)."""
    apply = as_batch_handler(handler)
    app = FastAPI(title=f"{agency} webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/events")
    async def receive_event(request: Request) -> JSONResponse:
        try:
            body = await _body(request)
        except _TooLarge:
            return _problem(413, "Too large", f"a webhook body is at most {MAX_BODY} bytes")
        headers = dict(request.headers)
        if not _verified(secrets, body, headers):
            return _problem(401, "Not signed", "the Standard Webhooks signature is missing, wrong or stale")
        if headers.get("content-type", "").split(";")[0].strip() != AVRO:
            return _problem(415, "Not Avro", f"this receiver takes {AVRO} bodies")
        read = Read.of(
            _as_record(kafka_headers(headers), headers.get("ce-subject"), body)  # what the SDK checks
        )
        if read.problem is not None:
            return _problem(422, "Not a CloudEvent", read.problem)
        try:
            office_keys = await keys.resolve(
                [read.key_id] if read.key_id and not read.is_consent_change else []
            )
            service_keys = await consent_keys.resolve(
                [read.key_id] if read.key_id and read.is_consent_change else []
            )
            event = checked_event(agency, read, office_keys, service_keys)
        except (UndecodableMessage, SignatureRejected, ValueError) as exc:
            return _problem(422, "Not verified", str(exc))
        if event.event_id != headers.get("webhook-id"):
            return _problem(422, "Not verified", "webhook-id is not the event's id")
        receipt = (await apply_batch(pool, agency, [event], apply))[event.event_id]
        await mark_receipted(
            pool, agency, [event.event_id]
        )  # this answer is its receipt: a repeat is a duplicate
        answer: dict[str, Any] = {
            "event_id": receipt.event_id,
            "outcome": receipt.outcome,
            "reason": receipt.reason,
            "duplicate": receipt.duplicate,
        }
        return JSONResponse(answer)

    return app


def _as_record(headers: list[tuple[str, bytes]], subject: str | None, value: bytes) -> Record:
    """The request as the Kafka record it was, for the SDK's checks."""
    return ConsumerRecord(
        topic="webhook",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=subject.encode() if subject else None,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=len(value),
        headers=headers,
    )
