"""Citizens sign in through an OpenID Connect provider (GOV.UK One Login, or the
development provider in ``devstack.dev_idp``): this service is the relying party.

``/citizen/sign-in`` sends the browser to the provider with ``state``, ``nonce``
and a PKCE challenge; ``/citizen/callback`` checks the state against the browser
that started the sign-in, exchanges the code (Authlib's OAuth 2 client), verifies
the ID token (signature against the provider's published keys, issuer, audience,
nonce, expiry), reads the identity claims from userinfo, and starts a session that
knows the citizen by the pseudonymous subject id derived from their National
Insurance number. The NINO is used for that one derivation and never stored or
logged. ``current_citizen`` (``CurrentCitizen``) is the dependency citizens' pages use.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import asyncpg
import httpx
import structlog
from authlib.integrations.base_client.errors import OAuthError  # type: ignore[import-untyped]
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import ClaimsOption, JWTClaimsRegistry

from citizens import sessions
from runtime.pseudonyms import subject_id_for
from runtime.sealing import PayloadSealer
from runtime.settings import MissingSetting, Settings
from runtime.web.pages import add_templates, redirect, render
from runtime.web.sessions import CookiePolicy, Expired, same_secret, token_hash
from schemas.validation import normalise_nino

log = structlog.get_logger(__name__)

# The citizens' pages (these messages among them) join the service's one page environment.
add_templates(Path(__file__).parent / "templates")

CALLBACK_PATH = "/citizen/callback"
HOME_PATH = "/citizen"
ACCEPTED_ALGORITHMS = ("ES256", "RS256")
# Pages a sign-in may return to: this service's own citizen pages, nothing else.
_RETURN_PREFIX = "/citizen/"


# GOV.UK One Login's claims: the verified NINO, and the identity with the name.
SOCIAL_SECURITY_RECORD = "https://vocab.account.gov.uk/v1/socialSecurityRecord"
CORE_IDENTITY_JWT = "https://vocab.account.gov.uk/v1/coreIdentityJWT"


@dataclass(frozen=True)
class Citizen:
    """A signed-in citizen, as the pages see them."""

    subject_id: str
    display_name: str
    csrf_token: str


PROVEN_LEVEL = "P2"  # GOV.UK One Login: identity proven to a medium level of confidence
PROVEN_IDENTITY_VECTOR = "Cl.Cm.P2"


class SignInRequired(Exception):
    """No current citizen session: the browser is sent to sign in, then back to ``return_to``."""

    def __init__(self, return_to: str | None) -> None:
        super().__init__("citizen sign-in required")
        self.return_to = return_to


class SignInFailed(Exception):
    """The provider's answer cannot be trusted or used; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RelyingParty:
    """This service's registration with the provider."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_url: str
    scopes: str

    @classmethod
    def from_settings(cls, settings: Settings) -> RelyingParty:
        if not settings.oidc_issuer:
            raise MissingSetting("oidc_issuer", "the identity provider's issuer URL, e.g. GOV.UK One Login's")
        if not settings.oidc_client_id or settings.oidc_client_secret is None:
            raise MissingSetting(
                "oidc_client_id", "and TUO_OIDC_CLIENT_SECRET: as registered with the provider"
            )
        return cls(
            issuer=settings.oidc_issuer.rstrip("/"),
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret.get_secret_value(),
            redirect_url=settings.oidc_redirect_url or settings.public_url.rstrip("/") + CALLBACK_PATH,
            scopes=settings.oidc_scopes,
        )


@dataclass(frozen=True)
class VerifiedIdentity:
    provider_subject: str
    nino: str
    display_name: str


class IdentityProvider:
    """The provider as the relying party sees it: its metadata and keys (cached, keys
    fetched again when a token names one not seen yet), and the protocol's steps."""

    def __init__(self, party: RelyingParty) -> None:
        self.party = party
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.party.client_id,
            client_secret=self.party.client_secret,
            token_endpoint_auth_method="client_secret_basic",  # noqa: S106 (a method, not a secret)
            scope=self.party.scopes,
            redirect_uri=self.party.redirect_url,
            code_challenge_method="S256",
            timeout=10,
        )

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.get(f"{self.party.issuer}/.well-known/openid-configuration")
                answer.raise_for_status()
                metadata: dict[str, Any] = answer.json()
            if metadata.get("issuer") != self.party.issuer:
                raise SignInFailed("discovery document names another issuer")
            self._metadata = metadata
        return self._metadata

    async def keys(self, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.get((await self.metadata())["jwks_uri"])
                answer.raise_for_status()
                self._keys = KeySet.import_key_set(answer.json())
        return self._keys

    async def authorization_url(self, state: str, nonce: str, code_verifier: str) -> str:
        # As GOV.UK One Login, the identity claims are asked for by name, from userinfo.
        claims = {"userinfo": {SOCIAL_SECURITY_RECORD: None, CORE_IDENTITY_JWT: None}}
        async with self._client() as client:
            url, _ = client.create_authorization_url(
                (await self.metadata())["authorization_endpoint"],
                state=state,
                code_verifier=code_verifier,
                nonce=nonce,
                claims=json.dumps(claims, separators=(",", ":")),
                vtr=json.dumps([PROVEN_IDENTITY_VECTOR]),  # a proven identity (GOV.UK One Login's P2)
            )
        return str(url)

    async def sign_in(self, code: str, code_verifier: str, nonce: str) -> VerifiedIdentity:
        metadata = await self.metadata()
        async with self._client() as client:
            try:
                token = await client.fetch_token(
                    metadata["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
            except OAuthError as refused:
                raise SignInFailed(f"the provider refused the code: {refused.error}") from refused
            id_token = await self.verify(
                str(token.get("id_token", "")), {"aud": self.party.client_id, "nonce": nonce}
            )
            answer = await client.get(metadata["userinfo_endpoint"])
        if answer.status_code != 200:
            raise SignInFailed(f"userinfo answered {answer.status_code}")
        info: dict[str, Any] = answer.json()
        if info.get("sub") != id_token["sub"]:
            raise SignInFailed("userinfo is about someone else than the ID token")
        # The NINO is believed only with a proven identity: a signed identity credential at P2.
        name = await self._proven_name(info, id_token["sub"])
        return VerifiedIdentity(id_token["sub"], _nino(info), name)

    async def verify(self, token: str, expected: dict[str, str]) -> dict[str, Any]:
        """A JWT's claims, once its signature is one of the provider's keys' and its
        issuer, expiry and ``expected`` claims are right."""
        if not token:
            raise SignInFailed("no ID token")
        try:
            try:
                decoded = jwt.decode(token, await self.keys(), algorithms=list(ACCEPTED_ALGORITHMS))
            except InvalidKeyIdError:
                # A kid not seen yet: the provider may have rotated its keys.
                decoded = jwt.decode(
                    token, await self.keys(refresh=True), algorithms=list(ACCEPTED_ALGORITHMS)
                )
            options: dict[str, ClaimsOption] = {
                "iss": {"essential": True, "value": self.party.issuer},
                "sub": {"essential": True},
                "exp": {"essential": True},
                "iat": {"essential": True},
            }
            for name, value in expected.items():
                options[name] = {"essential": True, "value": value}
            registry = JWTClaimsRegistry(now=None, leeway=60, **options)
            registry.validate(decoded.claims)
        except (JoseError, ValueError) as bad:
            raise SignInFailed(f"token not valid: {type(bad).__name__}") from bad
        return dict(decoded.claims)

    async def _proven_name(self, info: dict[str, Any], provider_subject: str) -> str:
        core_identity = info.get(CORE_IDENTITY_JWT)
        if not isinstance(core_identity, str):
            raise SignInFailed("no proven identity (core identity credential) from the provider")
        claims = await self.verify(core_identity, {"sub": provider_subject, "vot": PROVEN_LEVEL})
        try:
            names = claims["vc"]["credentialSubject"]["name"][0]["nameParts"]
            return " ".join(str(part["value"]) for part in names)
        except (KeyError, IndexError, TypeError):
            return ""


def _nino(info: dict[str, Any]) -> str:
    records = info.get(SOCIAL_SECURITY_RECORD)
    try:
        return normalise_nino(str(records[0]["personalNumber"]))  # type: ignore[index]
    except (KeyError, IndexError, TypeError, ValueError) as missing:
        raise SignInFailed("the provider did not share a valid National Insurance number") from missing


def _return_path(value: str | None) -> str | None:
    if value and value.startswith(_RETURN_PREFIX) and "//" not in value and "\\" not in value:
        return value[:500]
    return None


class CitizenCookies(CookiePolicy):
    @property
    def session(self) -> str:
        return "__Host-tuo-citizen" if self.secure else "tuo-citizen"

    @property
    def sign_in(self) -> str:
        return "__Host-tuo-citizen-sign-in" if self.secure else "tuo-citizen-sign-in"


@dataclass(frozen=True)
class SignInService:
    """What the sign-in routes work with, put on the app by ``install_citizen_sign_in``."""

    settings: Settings
    pool: asyncpg.Pool
    provider: IdentityProvider
    cookies: CitizenCookies
    sealer: PayloadSealer
    pseudonym_key: bytes

    @classmethod
    def from_settings(cls, settings: Settings, pool: asyncpg.Pool) -> SignInService:
        return cls(
            settings,
            pool,
            IdentityProvider(RelyingParty.from_settings(settings)),
            CitizenCookies(settings.session_cookie_secure),
            PayloadSealer.from_settings(settings),
            settings.require_pseudonym_key(),
        )


def sign_in_service(request: Request) -> SignInService:
    service: SignInService | None = getattr(request.app.state, "citizen_sign_in", None)
    if service is None:
        raise RuntimeError("citizens' sign-in is not installed on this app (install_citizen_sign_in)")
    return service


SignInDep = Annotated[SignInService, Depends(sign_in_service)]

router = APIRouter(include_in_schema=False)


@router.get("/citizen/sign-in")
async def sign_in(service: SignInDep, next: str | None = None) -> Response:
    state, nonce, browser = (secrets.token_urlsafe(32) for _ in range(3))
    # 48 random bytes: 64 characters, within RFC 7636's 43 to 128 for a PKCE verifier.
    verifier = secrets.token_urlsafe(48)
    try:
        target = await service.provider.authorization_url(state, nonce, verifier)
    except PROVIDER_FAILURES as failed:
        log.warning("citizen_sign_in_unavailable", error=type(failed).__name__)
        return _unavailable_page(service.cookies)
    await sessions.begin_sign_in(service.pool, state, browser, nonce, verifier, _return_path(next))
    response = redirect(target)
    service.cookies.set(response, service.cookies.sign_in, browser)
    return response


@router.get(CALLBACK_PATH)
async def callback(
    request: Request,
    service: SignInDep,
    state: str = "",
    code: str = "",
    error: str | None = None,
    iss: str | None = None,
) -> Response:
    pool, cookies = service.pool, service.cookies
    pending = await sessions.take_sign_in(pool, state, request.cookies.get(cookies.sign_in, ""))
    if pending is None:
        log.info("citizen_sign_in_refused", reason="unknown, used or expired state, or another browser's")
        return _failed_page(cookies, "The sign-in link had expired or was not started here.")
    if error is not None:
        log.info("citizen_sign_in_refused", reason="provider answered with an error", error=error[:100])
        return _failed_page(cookies, "You did not finish signing in.")
    try:
        if iss is not None and iss != service.provider.party.issuer:
            raise SignInFailed("answer from another issuer (RFC 9207)")
        identity = await service.provider.sign_in(code, pending.code_verifier, pending.nonce)
    except SignInFailed as failed:
        log.warning("citizen_sign_in_refused", reason=failed.reason)
        return _failed_page(cookies, "We could not confirm who you are.")
    except PROVIDER_FAILURES as failed:  # unreachable, or an answer that is not what it should be
        log.warning("citizen_sign_in_unavailable", error=type(failed).__name__)
        return _unavailable_page(cookies)
    subject_id = subject_id_for(identity.nino, service.pseudonym_key)
    earlier = request.cookies.get(cookies.session)
    if earlier:
        await sessions.CITIZEN_SESSIONS.end(pool, token_hash(earlier))
    await sessions.CITIZEN_SESSIONS.forget_expired(pool, service.settings)
    token, _ = await sessions.start_session(pool, service.sealer, subject_id, identity.display_name)
    log.info("citizen_signed_in", subject_id=subject_id)
    response = redirect(pending.return_to or HOME_PATH)
    cookies.set(response, cookies.session, token)
    cookies.clear(response, cookies.sign_in)
    return response


@router.post("/citizen/sign-out")
async def sign_out(request: Request, service: SignInDep) -> Response:
    found = await _session_of(request, service)
    if isinstance(found, sessions.CitizenSession):
        form = await request.form()
        given = form.get("csrf_token")
        if not same_secret(found.csrf_token, given if isinstance(given, str) else None):
            return render("citizen_message.html", 403, title="Sign-out not confirmed", lines=["Try again."])
        await sessions.CITIZEN_SESSIONS.end(service.pool, found.token_hash)
        log.info("citizen_signed_out", subject_id=found.subject_id)
    response = redirect("/citizen/signed-out")
    service.cookies.clear(response, service.cookies.session)
    return response


@router.get("/citizen/signed-out")
async def signed_out() -> Response:
    return render(
        "citizen_message.html",
        title="You have signed out",
        lines=[],
        link=("/citizen/sign-in", "Sign in again"),
    )


async def _session_of(request: Request, service: SignInService) -> sessions.CitizenSession | Expired | None:
    token = request.cookies.get(service.cookies.session, "")
    if not token:
        return None
    return await sessions.CITIZEN_SESSIONS.find(service.pool, service.sealer, token, service.settings)


# The provider unreachable or answering nonsense: the citizen is told to try later (503),
# never shown a server error.
PROVIDER_FAILURES = (httpx.HTTPError, ValueError, KeyError, TypeError)


def _unavailable_page(cookies: CookiePolicy) -> Response:
    response = render(
        "citizen_message.html",
        503,
        title="Sign-in is not available right now",
        lines=["We could not reach the service that checks who you are. Try again in a few minutes."],
        link=("/citizen/sign-in", "Try again"),
    )
    cookies.clear(response, cookies.sign_in)
    return response


def _failed_page(cookies: CookiePolicy, why: str) -> Response:
    response = render(
        "citizen_message.html",
        400,
        title="You are not signed in",
        lines=[why],
        link=("/citizen/sign-in", "Try signing in again"),
    )
    cookies.clear(response, cookies.sign_in)
    return response


async def current_citizen(request: Request) -> Citizen:
    """The signed-in citizen; without a session, ``SignInRequired`` (which the app answers
    with a redirect to sign in, see ``install_citizen_sign_in``)."""
    found = await _session_of(request, sign_in_service(request))
    if not isinstance(found, sessions.CitizenSession):
        raise SignInRequired(_return_path(request.url.path))
    return Citizen(found.subject_id, found.display_name, found.csrf_token)


CurrentCitizen = Annotated[Citizen, Depends(current_citizen)]


async def sign_in_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    target = "/citizen/sign-in"
    if exc.return_to:
        target += "?next=" + quote(exc.return_to, safe="/")
    return redirect(target)


def install_citizen_sign_in(app: FastAPI, settings: Settings, pool: asyncpg.Pool) -> None:
    """Mount the sign-in routes on ``app``, and answer ``SignInRequired`` with a redirect."""
    app.state.citizen_sign_in = SignInService.from_settings(settings, pool)
    app.include_router(router)
    app.add_exception_handler(SignInRequired, sign_in_required)
