"""A small OpenID Connect provider with test identities, for the local stack and the tests.

It speaks enough of the protocol that the citizens' sign-in is exercised for real:
discovery, JWKS, the authorization code flow with PKCE (S256 only) and ``nonce``,
a token endpoint issuing an ES256-signed ID token, and userinfo. Identity claims
take the shape GOV.UK One Login uses: the National Insurance number under
``https://vocab.account.gov.uk/v1/socialSecurityRecord`` and the verified name in
a signed ``https://vocab.account.gov.uk/v1/coreIdentityJWT``, both from userinfo
and only when asked for in the ``claims`` request parameter.

It is a development tool: identities are fixed, nothing is persisted, and whoever
reaches the page can be anyone on the list. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from citizens.signin import CORE_IDENTITY_JWT, SOCIAL_SECURITY_RECORD

log = structlog.get_logger(__name__)

IDENTITY_CLAIMS = (SOCIAL_SECURITY_RECORD, CORE_IDENTITY_JWT)

CODE_LIFETIME_SECONDS = 60
TOKEN_LIFETIME_SECONDS = 300
SIGNING_ALGORITHM = "ES256"


@dataclass(frozen=True)
class TestIdentity:
    """A person the development provider can sign in as."""

    sub: str
    given_name: str
    family_name: str
    birth_date: str
    nino: str

    @property
    def name(self) -> str:
        return f"{self.given_name} {self.family_name}"


# Two are people in the demo's events (`tuo demo`), so signing in as them shows their
# records; the third is known to no agency.
TEST_IDENTITIES = (
    TestIdentity("urn:fdc:tuo.dev:2024:jo-citizen", "Jo", "Citizen", "1985-07-14", "CE654321A"),
    TestIdentity("urn:fdc:tuo.dev:2024:chris-example", "Chris", "Example", "1943-05-09", "CE112233D"),
    TestIdentity("urn:fdc:tuo.dev:2024:amara-okafor", "Amara", "Okafor", "1990-11-23", "AB987654C"),
)


@dataclass(frozen=True)
class RegisteredClient:
    client_id: str
    client_secret: str
    redirect_uris: frozenset[str]


@dataclass
class _Grant:
    """What an authorization code stands for, until it is exchanged (once)."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str
    identity: TestIdentity
    claims: frozenset[str]
    expires_at: float
    used: bool = False
    access_tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _AccessToken:
    identity: TestIdentity
    claims: frozenset[str]
    expires_at: float


class AuthorizationRefused(Exception):
    """The authorization request cannot be answered by redirecting back to the client."""


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_signing_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": secrets.token_hex(8), "use": "sig"}, private=True)


class DevIdentityProvider:
    """The provider's state: its issuer URL, clients, keys, codes and access tokens."""

    def __init__(
        self,
        issuer: str,
        clients: list[RegisteredClient],
        identities: tuple[TestIdentity, ...] = TEST_IDENTITIES,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.clients = {client.client_id: client for client in clients}
        self.identities = {identity.sub: identity for identity in identities}
        self.signing_key = new_signing_key()
        # The keys published at jwks_uri; normally the signing key. Tests replace the
        # signing key alone to stand for a forger or a key that changed unannounced.
        self.published_keys = KeySet([self.signing_key])
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: dict[str, _AccessToken] = {}

    def register_client(self, client: RegisteredClient) -> None:
        self.clients[client.client_id] = client

    def rotate_key(self) -> None:
        """A new key, published in place of the old one (as a provider rotating its keys)."""
        self.signing_key = new_signing_key()
        self.published_keys = KeySet([self.signing_key])

    # Endpoints' logic, independent of HTTP

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALGORITHM],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid"],
            "claims_parameter_supported": True,
            "claims_supported": ["sub", "iss", "aud", "nonce", *IDENTITY_CLAIMS],
            "authorization_response_iss_parameter_supported": True,
        }

    def check_client(self, params: dict[str, str]) -> RegisteredClient:
        """The client and redirect URI, which must be right before any redirect is made."""
        client = self.clients.get(params.get("client_id", ""))
        if client is None:
            raise AuthorizationRefused(
                "This service is not registered with the provider (unknown client_id)."
            )
        if params.get("redirect_uri", "") not in client.redirect_uris:
            raise AuthorizationRefused("The redirect_uri is not one registered for this service.")
        return client

    def request_problem(self, params: dict[str, str]) -> str | None:
        """What is wrong with an authorization request from a known client, to send back."""
        if params.get("response_type") != "code":
            return "response_type must be code"
        if "openid" not in params.get("scope", "").split():
            return "scope must include openid"
        if not params.get("nonce"):
            return "nonce is required"
        if params.get("code_challenge_method") != "S256" or len(params.get("code_challenge", "")) != 43:
            return "PKCE with code_challenge_method S256 is required"
        return None

    def requested_claims(self, claims_parameter: str | None) -> frozenset[str]:
        if not claims_parameter:
            return frozenset()
        try:
            asked = json.loads(claims_parameter).get("userinfo") or {}
        except (ValueError, AttributeError):
            return frozenset()
        return frozenset(name for name in asked if name in IDENTITY_CLAIMS)

    def issue_code(self, params: dict[str, str], identity: TestIdentity) -> str:
        code = secrets.token_urlsafe(32)
        self._grants[code] = _Grant(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            code_challenge=params["code_challenge"],
            nonce=params["nonce"],
            identity=identity,
            claims=self.requested_claims(params.get("claims")),
            expires_at=time.time() + CODE_LIFETIME_SECONDS,
        )
        return code

    def exchange(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        """The token endpoint: (status, body)."""
        client = self._authenticate(form, authorization)
        if client is None:
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        grant = self._grants.get(form.get("code", ""))
        if grant is None or grant.client_id != client.client_id:
            return 400, {"error": "invalid_grant", "error_description": "unknown code"}
        if grant.used:
            # A code presented twice may have been stolen: revoke what it gave (RFC 6749 §4.1.2).
            for token in grant.access_tokens:
                self._access_tokens.pop(token, None)
            return 400, {"error": "invalid_grant", "error_description": "code already used"}
        grant.used = True
        if grant.expires_at < time.time():
            return 400, {"error": "invalid_grant", "error_description": "code expired"}
        if form.get("redirect_uri") != grant.redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri differs"}
        verifier = form.get("code_verifier", "")
        if not 43 <= len(verifier) <= 128 or not hmac.compare_digest(s256(verifier), grant.code_challenge):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        access_token = secrets.token_urlsafe(32)
        grant.access_tokens.append(access_token)
        self._access_tokens[access_token] = _AccessToken(
            grant.identity, grant.claims, now + TOKEN_LIFETIME_SECONDS
        )
        id_token = self.sign(
            {
                "iss": self.issuer,
                "aud": client.client_id,
                "sub": grant.identity.sub,
                "iat": now,
                "exp": now + TOKEN_LIFETIME_SECONDS,
                "auth_time": now,
                "nonce": grant.nonce,
            }
        )
        return 200, {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_SECONDS,
            "id_token": id_token,
        }

    def userinfo(self, authorization: str | None) -> dict[str, Any] | None:
        scheme, _, token = (authorization or "").partition(" ")
        found = self._access_tokens.get(token) if scheme.lower() == "bearer" else None
        if found is None or found.expires_at < time.time():
            return None
        identity = found.identity
        info: dict[str, Any] = {"sub": identity.sub}
        if SOCIAL_SECURITY_RECORD in found.claims:
            info[SOCIAL_SECURITY_RECORD] = [{"personalNumber": identity.nino}]
        if CORE_IDENTITY_JWT in found.claims:
            now = int(time.time())
            info[CORE_IDENTITY_JWT] = self.sign(
                {
                    "iss": self.issuer,
                    "sub": identity.sub,
                    "nbf": now,
                    "iat": now,
                    "exp": now + TOKEN_LIFETIME_SECONDS,
                    "vot": "P2",
                    "vc": {
                        "type": ["VerifiableCredential", "IdentityCheckCredential"],
                        "credentialSubject": {
                            "name": [
                                {
                                    "nameParts": [
                                        {"type": "GivenName", "value": identity.given_name},
                                        {"type": "FamilyName", "value": identity.family_name},
                                    ]
                                }
                            ],
                            "birthDate": [{"value": identity.birth_date}],
                        },
                    },
                }
            )
        return info

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": SIGNING_ALGORITHM, "kid": self.signing_key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.signing_key)

    def _authenticate(self, form: dict[str, str], authorization: str | None) -> RegisteredClient | None:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode()
            except ValueError:
                return None
            client_id, _, secret = decoded.partition(":")
        client = self.clients.get(client_id)
        if client is None or not hmac.compare_digest(client.client_secret.encode(), secret.encode()):
            return None
        return client


def create_dev_idp_app(provider: DevIdentityProvider) -> FastAPI:
    app = FastAPI(title="Development identity provider", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> JSONResponse:
        return JSONResponse(provider.discovery())

    @app.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        return JSONResponse(provider.published_keys.as_dict(private=False))

    @app.get("/authorize")
    async def authorize(request: Request) -> Response:
        return _authorize(provider, dict(request.query_params), choice=None)

    @app.post("/authorize")
    async def choose(request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        return _authorize(provider, form, choice=form.pop("identity", ""))

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        form = {key: str(value) for key, value in (await request.form()).items()}
        status, body = provider.exchange(form, request.headers.get("authorization"))
        if status != 200:
            log.info("dev_idp_token_refused", error=body["error"], reason=body.get("error_description"))
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    @app.get("/userinfo")
    async def userinfo(request: Request) -> JSONResponse:
        info = provider.userinfo(request.headers.get("authorization"))
        if info is None:
            return JSONResponse(
                {"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return JSONResponse(info, headers={"Cache-Control": "no-store"})

    return app


_AUTHORIZE_PARAMS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "claims",
)


def _authorize(provider: DevIdentityProvider, params: dict[str, str], choice: str | None) -> Response:
    try:
        provider.check_client(params)
    except AuthorizationRefused as refused:
        return _page("Sign-in request refused", f"<p>{html.escape(str(refused))}</p>", status=400)
    params = {key: params[key] for key in _AUTHORIZE_PARAMS if key in params}
    problem = provider.request_problem(params)
    if problem is not None:
        return _back(provider, params, {"error": "invalid_request", "error_description": problem})
    if choice is None:
        return _choose_identity_page(provider, params)
    identity = provider.identities.get(choice)
    if identity is None:
        return _back(provider, params, {"error": "access_denied"})
    return _back(provider, params, {"code": provider.issue_code(params, identity)})


def _back(provider: DevIdentityProvider, params: dict[str, str], answer: dict[str, str]) -> Response:
    answer = {**answer, "iss": provider.issuer}
    if "state" in params:
        answer["state"] = params["state"]
    separator = "&" if "?" in params["redirect_uri"] else "?"
    return RedirectResponse(f"{params['redirect_uri']}{separator}{urlencode(answer)}", status_code=303)


def _choose_identity_page(provider: DevIdentityProvider, params: dict[str, str]) -> HTMLResponse:
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(key)}" value="{html.escape(value)}">'
        for key, value in params.items()
    )
    buttons = "".join(
        f'<li><button type="submit" name="identity" value="{html.escape(identity.sub)}">'
        f"Sign in as {html.escape(identity.name)}</button></li>"
        for identity in provider.identities.values()
    )
    body = (
        "<p>This is a development identity provider. Choose a test person to sign in as.</p>"
        f'<form method="post" action="/authorize">{hidden}<ul>{buttons}</ul></form>'
    )
    return _page("Choose a test identity", body)


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} – development identity provider</title></head>"
        f"<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>",
        status_code=status,
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process embedding it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_loopback(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one), so the issuer URL is known
    before the provider is built."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def serve_dev_idp(
    provider: DevIdentityProvider, sock: socket.socket, stop: asyncio.Event, ready: asyncio.Future[str]
) -> None:
    """Serve ``provider`` on ``sock`` until ``stop`` is set; ``ready`` gets the issuer URL."""
    config = uvicorn.Config(
        create_dev_idp_app(provider), log_level="warning", access_log=False, lifespan="off"
    )
    server = _EmbeddedServer(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await serving
            raise RuntimeError("the development identity provider could not start")
        await asyncio.sleep(0.05)
    if not ready.done():
        ready.set_result(provider.issuer)
    log.info("dev_idp_listening", issuer=provider.issuer)
    await stop.wait()
    server.should_exit = True
    await serving


@contextlib.asynccontextmanager
async def running_dev_idp(
    clients: list[RegisteredClient], port: int = 0
) -> AsyncIterator[DevIdentityProvider]:
    """A development provider listening on 127.0.0.1 for the duration of the block."""
    sock = bind_loopback(port)
    provider = DevIdentityProvider(f"http://127.0.0.1:{sock.getsockname()[1]}", clients)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve_dev_idp(provider, sock, stop, ready))
    try:
        waiters: list[asyncio.Future[object]] = [ready, serving]  # type: ignore[list-item]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            await serving
        yield provider
    finally:
        stop.set()
        await serving
        sock.close()
