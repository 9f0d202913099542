"""How many requests a client may make: a token bucket per client, in process memory.

Each client (an API token's holder, a signed-in registrar, or else an address)
has a bucket holding up to a minute's allowance; every request takes one token,
and tokens come back at the allowed rate. An empty bucket refuses, saying how
long until the next token. Only the most recently seen clients are remembered,
so memory stays bounded however many addresses or tokens are tried; a client
that is forgotten starts again with a full bucket, which is what an idle client
would have anyway.

``RateLimiter`` and ``KnownClients`` are pure logic (the clock is passed in), so
their tests need no server and no waiting; ``Throttle`` puts them in front of the
intake app.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog
from starlette.requests import Request, cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = structlog.get_logger(__name__)

MAX_CLIENTS = 10_000
SIGN_IN_PATH = "/sign-in"
CITIZEN_SIGN_IN_PATH = "/citizen/sign-in"  # each GET starts a sign-in (a database row)
INFORMANT_SIGN_IN_PATH = "/tell-us-once/reference"  # a reference and a date of birth, checked
SIGN_IN_REQUESTS = (("POST", SIGN_IN_PATH), ("GET", CITIZEN_SIGN_IN_PATH), ("POST", INFORMANT_SIGN_IN_PATH))
_CLIENT_STATE = "rate_limit_client"
SYSTEM_CLIENT = "api:"  # how ``identify`` names an API token's holder

Credential = Literal["token", "session"]


@dataclass(frozen=True)
class Refusal:
    """Over the limit: try again after this many whole seconds."""

    retry_after: int


@dataclass
class _Bucket:
    tokens: float
    updated_at: float


class RateLimiter:
    """At most ``per_minute`` requests a minute per client, all of which may come at once."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1 or max_clients < 1:
            raise ValueError("a rate limit needs at least one request a minute and room for one client")
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many clients are remembered now."""
        return len(self._buckets)

    def admit(self, client: str) -> Refusal | None:
        """Take one request from ``client``'s allowance; a ``Refusal`` if there is none left."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = _Bucket(self.capacity, now)
            self._buckets[client] = bucket
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)  # the client seen least recently
        else:
            elapsed = max(0.0, now - bucket.updated_at)
            bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.per_second)
            bucket.updated_at = now
            self._buckets.move_to_end(client)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return Refusal(max(1, math.ceil((1.0 - bucket.tokens) / self.per_second)))


class KnownClients:
    """Which client a credential (a bearer token, a session cookie) belongs to, learnt
    when the app accepted it, and forgotten when the app refuses it. A request is
    counted against its client only while its credential is known, so made-up tokens
    cannot each get a fresh allowance: they count against their address. Only
    digests of credentials are kept."""

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self._clients: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def recognise(self, credential: str, client: str) -> None:
        digest = _digest(credential)
        self._clients[digest] = client
        self._clients.move_to_end(digest)
        if len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def forget(self, credential: str) -> None:
        self._clients.pop(_digest(credential), None)

    def client(self, credential: str) -> str | None:
        return self._clients.get(_digest(credential))


def _digest(credential: str) -> bytes:
    return hashlib.sha256(credential.encode()).digest()


def identify(request: Request, via: Credential, client: str | None) -> None:
    """Tell ``Throttle`` what the app made of the credential this request carried: whose
    it is (``api:<office>/<label>`` for a token, ``registrar:<username>`` for a session),
    or None when it was refused (unknown, expired, revoked)."""
    setattr(request.state, _CLIENT_STATE, (via, client))


class Throttle:
    """Refuse a client over its allowance with 429 and Retry-After, before the app reads
    the request. Signing in has a smaller allowance of its own, per address, so that
    guessing passwords across many usernames is slow too (each username is also locked
    after repeated failures, see ``runtime.web.sessions``). Systems holding an API token
    have an allowance of their own (``systems``), larger than a person needs."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        requests: RateLimiter,
        sign_ins: RateLimiter,
        systems: RateLimiter | None = None,
        clients: KnownClients,
        session_cookie: str,
        refuse: Callable[[Scope, int], Response],
    ) -> None:
        self.app = app
        self.requests = requests
        self.sign_ins = sign_ins
        self.systems = systems if systems is not None else requests  # a limiter with no clients is falsy
        self.clients = clients
        self.session_cookie = session_cookie
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = self._credentials(scope)
        known = (self.clients.client(c) for c in presented.values())
        client = next((k for k in known if k is not None), None)
        address = f"address:{scope['client'][0] if scope.get('client') else 'unknown'}"
        # A system holding an API token may submit a backlog at once: its own allowance.
        limiter = self.systems if client is not None and client.startswith(SYSTEM_CLIENT) else self.requests
        refusal = limiter.admit(f"client:{client}" if client else address)
        limit = "requests"
        signing_in = (scope["method"], scope["path"]) in SIGN_IN_REQUESTS
        if refusal is None and signing_in:
            refusal = self.sign_ins.admit(address)
            limit = "sign-in attempts"
        if refusal is not None:
            # Which kind of client and which limit; never who, or from where.
            kind = client.split(":", 1)[0] if client else "address"
            log.warning("http_rate_limited", client=kind, limit=limit, retry_after=refusal.retry_after)
            await self.refuse(scope, refusal.retry_after)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        await self.app(scope, receive, send)
        verdict: tuple[Credential, str | None] | None = state.get(_CLIENT_STATE)
        if verdict is None or verdict[0] not in presented:
            return
        via, accepted = verdict
        if accepted is None:
            self.clients.forget(presented[via])
        else:
            self.clients.recognise(presented[via], accepted)

    def _credentials(self, scope: Scope) -> dict[Credential, str]:
        """The bearer token and the session cookie, as presented (not yet checked)."""
        headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
        presented: dict[Credential, str] = {}
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            presented["token"] = token.strip()
        cookies: dict[str, str] = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
        if cookies.get(self.session_cookie):
            presented["session"] = cookies[self.session_cookie]
        return presented
