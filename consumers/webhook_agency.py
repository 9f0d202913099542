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
   gets the first outcome back, marked duplicate);
5. posts its receipt (``APPLIED``, or ``REJECTED`` with the reason) to the bus's
   ``POST /v1/receipts`` with an OAuth2 client-credentials token (``ReceiptClient``),
   and answers 200 with the outcome. Should the receipt not get through, it answers 503:
   the bridge sends the event again, the inbox answers with the first outcome, and the
   receipt is posted again (the bus stores it once).

Any answer but a 2xx makes the bridge try again later, so an event that fails a check
here is not lost: it ends in the bus's dead letters, flagged overdue, if it never passes.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import structlog
from aiokafka.structs import ConsumerRecord
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from consumers.receipts import Receipt
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
from runtime.web.problems import BodySizeLimit, problem
from schemas import UndecodableMessage
from schemas.signatures import SignatureRejected

log = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024


def _refusal(secrets: Sequence[str], body: bytes, headers: dict[str, str]) -> str | None:
    """Why the Standard Webhooks signature does not hold with any of ``secrets`` (None: it holds)."""
    why = "no secret"
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
            return None
        except WebhookVerificationError as exc:
            why = str(exc)  # the library's words: missing headers, too old or new, no match
    return why


class ReceiptNotSent(RuntimeError):
    """The bus did not take a receipt (or a token): its status, or what went wrong."""


class ReceiptClient:
    """The agency's receipts to the bus over HTTPS: a client-credentials token from
    ``/oauth/token`` (kept until a minute before it expires), then ``POST /v1/receipts``."""

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, verify=verify, timeout=10, transport=transport)
        self.credentials = (client_id, client_secret)
        self._token: str | None = None
        self._renew_at = 0.0

    async def _access_token(self, renew: bool = False) -> str:
        if self._token is None or renew or time.monotonic() >= self._renew_at:
            answer = await self.http.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, auth=self.credentials
            )
            if answer.status_code != 200:
                raise ReceiptNotSent(f"no token: HTTP {answer.status_code} {answer.text[:200]}")
            issued = answer.json()
            self._token = str(issued["access_token"])
            self._renew_at = time.monotonic() + max(0, int(issued.get("expires_in", 0)) - 60)
        return self._token

    async def send(self, receipt: Receipt, received_at: datetime) -> None:
        body = {
            "event_id": receipt.event_id,
            "outcome": receipt.outcome,
            "reason": receipt.reason,
            "received_at": received_at.isoformat(),
        }
        for renew in (False, True):  # a token revoked or expired meanwhile: one more, then give up
            token = await self._access_token(renew)
            answer = await self.http.post(
                "/v1/receipts", json=body, headers={"Authorization": f"Bearer {token}"}
            )
            if answer.status_code in (200, 201):
                return
            if answer.status_code != 401:
                break
        raise ReceiptNotSent(f"HTTP {answer.status_code} {answer.text[:200]}")

    async def aclose(self) -> None:
        await self.http.aclose()


def create_receiver(
    pool: asyncpg.Pool,
    agency: str,
    secrets: Sequence[str],
    handler: Handler | BatchHandler,
    *,
    keys: KeyRing,
    consent_keys: KeyRing,
    receipts: ReceiptClient | None = None,
) -> FastAPI:
    """The agency's webhook receiver. ``secrets``: the Standard Webhooks secrets it accepts
    (two while it rotates); ``keys``/``consent_keys``: where the offices' and the consent
    service's public keys come from (``KeyRing.over_http`` for an agency elsewhere);
    ``receipts``: where its receipts go (None: the 200 answer is all the bus hears)."""
    apply = as_batch_handler(handler)
    app = FastAPI(title=f"{agency} webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodySizeLimit, limit=MAX_BODY)

    @app.post("/events")
    async def receive_event(request: Request) -> JSONResponse:
        body = await request.body()  # BodySizeLimit refused anything over MAX_BODY before this
        headers = dict(request.headers)
        refused = _refusal(secrets, body, headers)
        if refused is not None:
            return problem(401, "Not signed", f"the Standard Webhooks signature does not hold: {refused}")
        if headers.get("content-type", "").split(";")[0].strip() != AVRO:
            return problem(415, "Not Avro", f"this receiver takes {AVRO} bodies")
        read = Read.of(
            _as_record(kafka_headers(headers), headers.get("ce-subject"), body)  # what the SDK checks
        )
        if read.problem is not None:
            return problem(422, "Not a CloudEvent", read.problem)
        try:
            office_keys = await keys.resolve(
                [read.key_id] if read.key_id and not read.is_consent_change else []
            )
            service_keys = await consent_keys.resolve(
                [read.key_id] if read.key_id and read.is_consent_change else []
            )
            event = checked_event(agency, read, office_keys, service_keys)
        except (UndecodableMessage, SignatureRejected, ValueError) as exc:
            return problem(422, "Not verified", str(exc))
        if event.event_id != headers.get("webhook-id"):
            return problem(422, "Not verified", "webhook-id is not the event's id")
        received_at = datetime.now(UTC)
        receipt = (await apply_batch(pool, agency, [event], apply))[event.event_id]
        if receipts is not None and not receipt.duplicate:
            try:
                await receipts.send(receipt, received_at)
            except (ReceiptNotSent, httpx.HTTPError) as exc:
                log.warning("receipt_not_sent", agency=agency, event_id=event.event_id, error=str(exc)[:200])
                return problem(
                    503, "Receipt not sent", "Applied, but the receipt did not reach the bus; send it again."
                )
        await mark_receipted(pool, agency, [event.event_id])  # a repeat from now on is a duplicate
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
