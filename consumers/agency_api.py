"""The agencies' HTTPS API, for agencies that cannot run Kafka: receipts in, and a pull
feed of what was delivered to them, behind OAuth2 client credentials.

``POST /oauth/token``      an access token for an agency's client (RFC 6749 §4.4, issued
                           by Authlib's authorization server; client_secret_basic or
                           client_secret_post). Tokens last an hour.
``POST /v1/receipts``      a delivery receipt, with the same meaning as one on the
                           agency's receipt topic, stored the same way
                           (``router.tracker.store_receipt``: one per event, agency and
                           outcome; a repeat is answered 200 and changes nothing).
``GET /v1/agency/events``  what was delivered to the caller's agency since a time, in
                           order, with the receipt it has sent for each: to reconcile
                           after an outage.
``POST /v1/agency/interest``  register (or withdraw) the people the agency holds records
                           for, by NINO (``router.interest``): a subscription scoped to
                           registered subjects tells it only of them.
``GET /v1/agency/subscriptions``  the agency's subscriptions in force, every earlier
                           version, and its requests to change them.
``POST /v1/agency/subscriptions/changes``  ask for new terms for one event type
                           (``router.subscription_versions``): a narrowing is in force at
                           once (201); anything wider waits for an operator (202).

Every endpoint acts for the agency the token was issued to and no other: a receipt is
always the caller's own, and only for an event delivered to it; the feed is only its
own. Client secrets and tokens are kept only as SHA-256 hashes (both are 256 random
bits, so a hash cannot be guessed back); a secret is shown once, when it is made.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal

import asyncpg
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Request  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.util import extract_basic_authorization, list_to_scope, scope_to_list  # type: ignore[import-untyped]
from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from router import subscription_versions as versions
from router.interest import MAX_PER_REQUEST, NotANino, change_interest, interest_count, subject_ids
from router.subscription_request import SubscriptionRequest
from router.tracker import store_receipt
from runtime.access import AGENCY_NAME
from runtime.settings import Settings
from runtime.web.problems import problem
from runtime.web.sessions import token_hash  # SHA-256: secrets and tokens are 256 random bits

SCOPES = ("receipts:write", "events:read", "interest:write", "subscriptions:manage")
TOKEN_SECONDS = 3600
MAX_FORM = 4096
FEED_PAGE = 500
_LAST_UUID = uuid.UUID(int=(1 << 128) - 1)


class NoSuchAgency(LookupError):
    def __init__(self, agency: str) -> None:
        super().__init__(f"no agency {agency!r} is onboarded; see `tuo agencies add`")


@dataclass(frozen=True)
class NewClient:
    client_id: str
    client_secret: str  # shown once


async def create_client(
    pool: asyncpg.Pool, agency: str, *, by: str, scopes: tuple[str, ...] = SCOPES
) -> NewClient:
    """A new OAuth2 client for ``agency``'s systems, whose tokens may do ``scopes`` and no
    more; its secret is returned once."""
    if not scopes or not set(scopes) <= set(SCOPES):
        raise ValueError(f"scopes are some of {', '.join(SCOPES)}")
    if (
        not AGENCY_NAME.match(agency)
        or await pool.fetchval("SELECT status FROM agency_account WHERE agency = $1", agency) != "active"
    ):
        raise NoSuchAgency(agency)
    client = NewClient(f"{agency}.{secrets.token_hex(8)}", secrets.token_urlsafe(32))
    await pool.execute(
        "INSERT INTO agency_api_client (client_id, agency, secret_hash, created_by, scopes)"
        " VALUES ($1, $2, $3, $4, $5)",
        client.client_id,
        agency,
        token_hash(client.client_secret),
        by,
        sorted(set(scopes)),
    )
    return client


async def revoke_client(pool: asyncpg.Pool, client_id: str, *, by: str) -> bool:
    """Stop a client: no new tokens, and the tokens it holds stop working at once."""
    async with pool.acquire() as conn, conn.transaction():
        revoked = await conn.fetchval(
            "UPDATE agency_api_client SET revoked_at = now(), revoked_by = $2"
            " WHERE client_id = $1 AND revoked_at IS NULL RETURNING client_id",
            client_id,
            by,
        )
        await conn.execute("DELETE FROM agency_api_token WHERE client_id = $1", client_id)
    return revoked is not None


# --- issuing tokens: Authlib's authorization server, its I/O done around it -------------------


@dataclass
class AgencyClient(ClientMixin):  # type: ignore[misc]
    client_id: str
    agency: str
    secret_hash: bytes
    scopes: frozenset[str]  # what it was made for

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """What was asked for (all it may do, if nothing was), within what it may do;
        None (invalid_scope) when that leaves nothing."""
        asked = set(scope_to_list(scope)) if scope else set(SCOPES)
        allowed = [s for s in SCOPES if s in asked and s in self.scopes]
        return str(list_to_scope(allowed)) if allowed else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(token_hash(client_secret), self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class _ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post"]


class _FormRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, method: str, uri: str, headers: Any, form: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = form
        self.payload = BasicOAuth2Payload(form)

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return {}


@dataclass
class _TokenServer(AuthorizationServer):  # type: ignore[misc]
    """One token request's server: the client is looked up before (asyncpg is async, Authlib
    is not), and the token issued is stored after."""

    client: AgencyClient | None
    issued: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.register_grant(_ClientCredentials)
        self.register_token_generator(
            "default",
            BearerTokenGenerator(lambda **_: secrets.token_urlsafe(32), expires_generator=TOKEN_SECONDS),
        )

    def create_oauth2_request(self, request: _FormRequest) -> _FormRequest:
        return request  # made from the Starlette request by the endpoint

    def query_client(self, client_id: str) -> AgencyClient | None:
        return self.client if self.client is not None and self.client.client_id == client_id else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        self.issued.append(token)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def handle_response(self, status: int, body: Any, headers: Any) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=dict(headers))


def _named_client(request: Request, form: dict[str, str]) -> str | None:
    basic_id, _ = extract_basic_authorization(request.headers)
    return basic_id or form.get("client_id")


# --- who is calling ---------------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def _caller(pool: asyncpg.Pool, request: Request, scope: str) -> str:
    """The agency whose token the request carries, if the token is live and has ``scope``."""
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Refused(
            problem(
                401,
                "Not signed in",
                "Send an access token from /oauth/token.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )
    row = await pool.fetchrow(
        "SELECT t.agency, t.scope FROM agency_api_token t JOIN agency_api_client c USING (client_id)"
        "  JOIN agency_account a ON a.agency = t.agency"
        " WHERE t.token_hash = $1 AND t.expires_at > now() AND c.revoked_at IS NULL AND a.status = 'active'",
        token_hash(token.strip()),
    )
    if row is None:
        raise Refused(
            problem(
                401,
                "Token not accepted",
                "The access token is unknown, expired or revoked; get a new one from /oauth/token.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        )
    if scope not in row["scope"]:
        raise Refused(
            problem(
                403,
                "Not allowed",
                f"This token does not have the {scope} scope.",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        )
    agency: str = row["agency"]
    return agency


# --- the endpoints ------------------------------------------------------------------------------


def _printable(reason: str | None) -> str | None:
    if reason is not None and not all(c.isprintable() for c in reason):
        raise ValueError("a reason is plain text on one line")
    return reason


class InterestIn(BaseModel):
    """People to register an interest in, and to withdraw, by National Insurance number."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    registering: list[Annotated[str, Field(max_length=20)]] = Field(
        default_factory=list, max_length=MAX_PER_REQUEST, alias="register"
    )
    withdrawing: list[Annotated[str, Field(max_length=20)]] = Field(
        default_factory=list, max_length=MAX_PER_REQUEST, alias="withdraw"
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> InterestIn:
        if not self.registering and not self.withdrawing:
            raise ValueError("give NINOs to register or to withdraw")
        return self


class ReceiptIn(BaseModel):
    """A delivery receipt: what the agency did with one event delivered to it."""

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID
    outcome: Literal["RECEIVED", "APPLIED", "REJECTED"]
    reason: Annotated[str | None, Field(min_length=3, max_length=500), AfterValidator(_printable)] = Field(
        default=None,
        description="Why it was rejected, in plain words and without personal data (seen by registrars "
        "and the citizen). Required for REJECTED, refused otherwise.",
    )
    received_at: AwareDatetime | None = Field(default=None, description="When the agency received it.")

    @model_validator(mode="after")
    def _reason_only_for_rejected(self) -> ReceiptIn:
        if (self.outcome == "REJECTED") != (self.reason is not None):
            raise ValueError("a REJECTED receipt needs a reason, and only a REJECTED one has one")
        return self


class SubscriptionChangeIn(BaseModel):
    """The whole terms an agency asks for, for one event type: what it would receive, on
    what basis, under what condition, for how long; and why it asks."""

    model_config = ConfigDict(extra="forbid")

    event_type: str = Field(max_length=40)
    basis: Literal["statutory", "consent"]
    statute: str | None = Field(default=None, max_length=300)
    fields: list[Annotated[str, Field(max_length=100)]] = Field(min_length=1, max_length=100)
    local_authorities: list[Annotated[str, Field(max_length=9)]] = Field(default_factory=list, max_length=50)
    registered_subjects: bool = False
    valid_from: AwareDatetime | None = None
    valid_to: AwareDatetime | None = None
    active: bool = Field(default=True, description="false: stop receiving this event type (a narrowing).")
    reason: Annotated[str, Field(min_length=3, max_length=500), AfterValidator(_printable)] = Field(
        description="Why you ask: kept with the version, and published in the public register (/register)."
    )


def agency_api(pool: asyncpg.Pool, pseudonym_key: Callable[[], bytes]) -> APIRouter:
    router = APIRouter(tags=["agencies"])

    @router.post("/oauth/token", include_in_schema=False)
    async def issue_token(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return JSONResponse(
                {"error": "invalid_request", "error_description": "send application/x-www-form-urlencoded"},
                status_code=400,
            )
        raw = await request.body()
        if len(raw) > MAX_FORM:
            return JSONResponse({"error": "invalid_request", "error_description": "body too large"}, 400)
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        client_id = _named_client(request, form)
        client = None
        if client_id:
            row = await pool.fetchrow(
                "SELECT c.client_id, c.agency, c.secret_hash, c.scopes FROM agency_api_client c"
                "  JOIN agency_account a USING (agency)"
                " WHERE c.client_id = $1 AND c.revoked_at IS NULL AND a.status = 'active'",
                client_id,
            )
            client = (
                None
                if row is None
                else AgencyClient(
                    row["client_id"], row["agency"], row["secret_hash"], frozenset(row["scopes"])
                )
            )
        server = _TokenServer(client)
        response: JSONResponse = server.create_token_response(
            _FormRequest(request.method, str(request.url), request.headers, form)
        )
        for token in server.issued:
            assert client is not None
            await pool.execute(
                "INSERT INTO agency_api_token (token_hash, client_id, agency, scope, expires_at)"
                " VALUES ($1, $2, $3, $4, now() + $5::interval)",
                token_hash(token["access_token"]),
                client.client_id,
                client.agency,
                scope_to_list(token.get("scope") or ""),
                timedelta(seconds=TOKEN_SECONDS),
            )
        response.headers["Cache-Control"] = "no-store"
        return response

    @router.post("/v1/receipts", status_code=201)
    async def post_receipt(receipt: ReceiptIn, request: Request) -> JSONResponse:
        """Tell the bus what the agency did with an event delivered to it."""
        try:
            agency = await _caller(pool, request, "receipts:write")
        except Refused as refused:
            return refused.response
        # The router's decision, or (stored sooner, before the POST) the webhook bridge's queue.
        delivered = await pool.fetchval(
            "SELECT 1 FROM routing_decision WHERE event_id = $1 AND agency = $2 AND outcome = 'DELIVERED'"
            " UNION ALL SELECT 1 FROM webhook_delivery WHERE event_id = $1 AND agency = $2 LIMIT 1",
            receipt.event_id,
            agency,
        )
        if delivered is None:
            return problem(
                404, "Not delivered to you", f"No event {receipt.event_id} was delivered to {agency}."
            )
        stored = await store_receipt(
            pool,
            event_id=receipt.event_id,
            agency=agency,
            outcome=receipt.outcome,
            reason=receipt.reason,
            issued_at=datetime.now(UTC),
            received_at=receipt.received_at,
        )
        body = {
            "event_id": str(receipt.event_id),
            "agency": agency,
            "outcome": receipt.outcome,
            "stored": stored,
        }
        return JSONResponse(body, status_code=201 if stored else 200)

    @router.get("/v1/agency/events")
    async def delivered_events(
        request: Request,
        since: Annotated[
            AwareDatetime, Query(description="Deliveries decided after this time (ISO 8601, with zone).")
        ],
        after: Annotated[
            uuid.UUID | None, Query(description="With since: after this event, at that time.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=FEED_PAGE)] = 100,
    ) -> JSONResponse:
        """What was delivered to the caller's agency, oldest first, a page at a time."""
        try:
            agency = await _caller(pool, request, "events:read")
        except Refused as refused:
            return refused.response
        rows = await pool.fetch(
            "SELECT d.event_id, d.event_type, d.decided_at, i.reference,"
            "       (SELECT array_agg(r.outcome ORDER BY r.issued_at) FROM delivery_receipt r"
            "         WHERE r.event_id = d.event_id AND r.agency = d.agency) AS receipts"
            "  FROM routing_decision d LEFT JOIN intake_record i ON i.event_id = d.event_id"
            " WHERE d.agency = $1 AND d.outcome = 'DELIVERED'"
            "   AND (d.decided_at, d.event_id) > ($2::timestamptz, coalesce($3::uuid, $5::uuid))"
            " ORDER BY d.decided_at, d.event_id LIMIT $4",
            agency,
            since,
            after,
            limit,
            _LAST_UUID,  # no `after`: only what was decided after `since` itself
        )
        events = [
            {
                "event_id": str(r["event_id"]),
                "event_type": r["event_type"],
                "reference": r["reference"],
                "delivered_at": r["decided_at"].isoformat(),
                "receipts": list(r["receipts"] or []),
            }
            for r in rows
        ]
        body: dict[str, Any] = {"agency": agency, "events": events}
        if len(rows) == limit:
            last = rows[-1]
            body["next"] = {"since": last["decided_at"].isoformat(), "after": str(last["event_id"])}
        return JSONResponse(body)

    @router.post("/v1/agency/interest")
    async def change_interest_in_people(change: InterestIn, request: Request) -> JSONResponse:
        """Register or withdraw the people the caller's agency wants to hear about."""
        try:
            agency = await _caller(pool, request, "interest:write")
        except Refused as refused:
            return refused.response
        try:
            key = pseudonym_key()
            register, withdraw = subject_ids(change.registering, key), subject_ids(change.withdrawing, key)
        except NotANino as exc:
            return problem(422, "Not National Insurance numbers", str(exc))
        if set(register) & set(withdraw):
            return problem(422, "Both at once", "A person cannot be registered and withdrawn in one request.")
        done = await change_interest(pool, agency, register=register, withdraw=withdraw, by=f"api:{agency}")
        return JSONResponse(
            {
                "agency": agency,
                "registered": done.registered,
                "withdrawn": done.withdrawn,
                "unchanged": done.unchanged,
                "registered_now": await interest_count(pool, agency),
            }
        )

    @router.get("/v1/agency/subscriptions")
    async def own_subscriptions(request: Request) -> JSONResponse:
        """The caller's subscriptions: every version (the one in force last, with no
        ``in_force_to``), and its requests to change them, newest first."""
        try:
            agency = await _caller(pool, request, "subscriptions:manage")
        except Refused as refused:
            return refused.response
        found = await versions.history(pool, agency)
        asked = await versions.changes(pool, agency=agency, pending_only=False)
        return JSONResponse(
            {
                "agency": agency,
                "in_force": [v.to_json() for v in found if v.in_force_to is None],
                "versions": [v.to_json() for v in found],
                "changes": [c.to_json() for c in reversed(asked)],
            }
        )

    @router.post("/v1/agency/subscriptions/changes")
    async def request_subscription_change(change: SubscriptionChangeIn, request: Request) -> JSONResponse:
        """Ask for new terms: in force at once if they narrow, else waiting for approval."""
        try:
            agency = await _caller(pool, request, "subscriptions:manage")
        except Refused as refused:
            return refused.response
        try:
            terms = SubscriptionRequest(agency=agency, **change.model_dump(exclude={"reason"})).terms()
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'terms'}: {e['msg']}" for e in exc.errors())
            return problem(422, "These terms cannot be granted", detail)
        try:
            made = await versions.request_change(
                pool, agency, change.event_type, terms, requested_by=f"api:{agency}", reason=change.reason
            )
        except versions.ChangeRefused as exc:
            return problem(409, "Not changed", str(exc))
        return JSONResponse(made.to_json(), status_code=201 if made.state == "applied" else 202)

    return router


def install_agency_api(app: FastAPI, pool: asyncpg.Pool, settings: Settings) -> None:
    app.include_router(agency_api(pool, settings.require_pseudonym_key))
