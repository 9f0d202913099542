"""The intake service's HTTP defences: security headers on every response, CSRF on
every form, a request allowance per client (stricter for signing in), sessions
that end on the server, and event status only for the office that recorded it.

The rate limiter's logic is tested on its own with a made-up clock; the rest
against the intake app on a real port and the real database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.responses import PlainTextResponse
from structlog.testing import capture_logs

from operators.services import RunningBus
from operators.web import create_app
from producers.accounts import add_registrar, issue_token
from producers.web.routes import pages
from runtime.settings import Settings
from runtime.web.rate_limit import KnownClients, RateLimiter
from runtime.web.security_headers import NOTHING_ALLOWED, security_headers
from tests.producers.test_web_forms import (
    PASSWORD,
    csrf,
    death_answers,
    new_registrar,
    records_by,
    serve_web,
    session_token,
    sign_in,
    signed_in,
    to_check_page,
    web_settings,
)
from tests.support import death_registration, tuo_cli

UNKNOWN_REFERENCE = "TUO-2026-0000-0000"
_SUBMISSION_ID = re.compile(r'name="submission_id" value="([^"]+)"')
SESSION_COOKIE = "tuo-session"  # the name when cookies are not Secure (plain-http tests)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# The rate limiter's logic, without a server


def test_a_client_may_use_a_minutes_allowance_at_once_then_waits_for_it_to_come_back() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.admit("client:a") for _ in range(3)] == [None, None, None]
    refused = limiter.admit("client:a")
    assert refused is not None and refused.retry_after == 20  # one request back every 20 s
    clock.now += 19.9
    assert limiter.admit("client:a") is not None
    clock.now += 0.1
    assert limiter.admit("client:a") is None
    clock.now += 3600
    assert [limiter.admit("client:a") for _ in range(4)][-1] is not None  # never more than 3 at once


def test_one_clients_requests_do_not_use_up_anothers_allowance() -> None:
    limiter = RateLimiter(2, clock=Clock())
    assert limiter.admit("client:a") is None and limiter.admit("client:a") is None
    assert limiter.admit("client:a") is not None
    assert limiter.admit("client:b") is None


def test_memory_stays_bounded_however_many_clients_are_tried() -> None:
    limiter = RateLimiter(1, max_clients=100, clock=Clock())
    clients = KnownClients(max_clients=100)
    assert limiter.admit("client:busy") is None
    for n in range(10_000):
        limiter.admit(f"address:{n}")
        clients.recognise(f"tuo_made-up-{n}", f"api:x/{n}")
        if n % 50 == 0:
            assert limiter.admit("client:busy") is not None  # recently seen: still remembered, still refused
    assert len(limiter) == 100 and len(clients) == 100
    assert clients.client("tuo_made-up-9999") == "api:x/9999"
    assert clients.client("tuo_made-up-0") is None


def test_a_credential_the_app_refused_no_longer_counts_against_its_holder() -> None:
    clients = KnownClients()
    clients.recognise("tuo_revoked-since", "api:leeds/desk system")
    assert clients.client("tuo_revoked-since") == "api:leeds/desk system"
    clients.forget("tuo_revoked-since")  # the app said 401: whoever sends it now counts as their address
    assert clients.client("tuo_revoked-since") is None


def test_the_header_policy_keeps_a_responses_own_policy_and_lets_only_assets_be_cached() -> None:
    page = dict(security_headers("/start", {b"content-security-policy"}, https=False))
    assert b"content-security-policy" not in page and page[b"cache-control"] == b"no-store"
    asset = dict(security_headers("/assets/govuk-frontend.min.css", set(), https=True))
    assert b"cache-control" not in asset
    assert asset[b"strict-transport-security"].startswith(b"max-age=")
    assert dict(security_headers("/v1/events/x", set(), https=False))[b"content-security-policy"] == (
        NOTHING_ALLOWED.encode()
    )


# Security headers on every response


def assert_protected(response: httpx.Response, *, https: bool, cacheable: bool = False) -> None:
    what = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    headers = response.headers
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("referrer-policy") == "no-referrer", what
    assert headers.get("x-frame-options") == "DENY", what
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), what
    assert headers.get("cross-origin-opener-policy") == "same-origin", what
    assert "camera=()" in headers.get("permissions-policy", ""), what
    assert ("strict-transport-security" in headers) is https, what
    if not cacheable:
        assert headers.get("cache-control") == "no-store", what


@pytest.fixture(scope="module")
async def monitoring_token(pool: asyncpg.Pool) -> str:
    return await issue_token(pool, "leeds", "monitoring", "http security test monitoring")


@pytest.fixture(scope="module")
async def leeds_event(bus: RunningBus, registrar_token: str) -> str:
    """A reference the Leeds office recorded (through the API)."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{bus.http_port}", headers={"Authorization": f"Bearer {registrar_token}"}
    ) as client:
        response = await client.post("/v1/death-registrations", json=death_registration())
    assert response.status_code in (200, 201), response.text
    reference: str = response.json()["reference"]
    return reference


async def test_every_kind_of_response_carries_the_security_headers(
    bus: RunningBus, intake: httpx.AsyncClient, monitoring_token: str, leeds_event: str
) -> None:
    # The bus serves with the production default, Secure cookies: so HTTPS, so HSTS.
    monitor = {"Authorization": f"Bearer {monitoring_token}"}
    responses = {
        "event status": await intake.get(f"/v1/events/{leeds_event}"),
        "unknown event": await intake.get(f"/v1/events/{UNKNOWN_REFERENCE}"),
        "no token": await intake.get(f"/v1/events/{leeds_event}", headers={"Authorization": ""}),
        "metrics, wrong role": await intake.get("/metrics"),
        "metrics": await intake.get("/metrics", headers=monitor),
        "too large": await intake.post(
            "/v1/death-registrations", content=b"{" * 70_000, headers={"Content-Type": "application/json"}
        ),
        "not JSON": await intake.post("/v1/death-registrations", data={"a": "b"}),
        "invalid": await intake.post("/v1/death-registrations", json={}),
        "schema registry": await intake.get("/subjects"),
        "key registry": await intake.get("/.well-known/jwks.json"),
        "health": await intake.get("/healthz"),
        "openapi": await intake.get("/openapi.json"),
        "no such path": await intake.get("/v1/no-such-thing"),
        "page": await intake.get("/sign-in"),
        "documentation": await intake.get("/docs"),
    }
    expected = {"event status": 200, "unknown event": 404, "no token": 401, "metrics, wrong role": 403}
    expected |= {"metrics": 200, "too large": 413, "not JSON": 415, "invalid": 422, "no such path": 404}
    for name, status in expected.items():
        assert responses[name].status_code == status, (name, responses[name].text)
    for name, response in responses.items():
        # Offices' public keys say themselves how long they may be cached.
        assert_protected(response, https=True, cacheable=name == "key registry")
        if response.headers["content-type"].startswith(("application/json", "application/problem+json")):
            assert response.headers["content-security-policy"] == NOTHING_ALLOWED, name
    assert "'nonce-" in responses["page"].headers["content-security-policy"]
    assert "'nonce-" in responses["documentation"].headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", responses["documentation"].headers["content-security-policy"])
    assert nonce and f'<script nonce="{nonce.group(1)}">' in responses["documentation"].text
    asset = await intake.get("/assets/govuk-frontend.min.css")
    assert asset.status_code == 200
    assert_protected(asset, https=True, cacheable=True)


async def test_even_a_server_error_carries_the_security_headers(
    services: Settings, pool: asyncpg.Pool
) -> None:
    app = create_app(web_settings(services), pool)

    async def broken() -> PlainTextResponse:
        raise RuntimeError("a bug")

    app.add_api_route("/broken", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
        response = await client.get("/broken")
    assert response.status_code == 500
    assert_protected(response, https=False)


# CSRF on every form


@contextlib.asynccontextmanager
async def web_server(services: Settings, pool: asyncpg.Pool, **changes: Any) -> AsyncIterator[str]:
    async with serve_web(web_settings(services).model_copy(update=changes), pool) as base_url:
        yield base_url


@pytest.fixture(scope="module")
async def web(services: Settings, pool: asyncpg.Pool, bus: RunningBus) -> AsyncIterator[str]:
    async with web_server(services, pool) as base_url:
        yield base_url


@pytest.fixture
async def browser(web: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web, timeout=20, follow_redirects=False) as client:
        yield client


def form_routes() -> list[str]:
    """Every form the registrars' pages accept (every POST route they have)."""
    return sorted(r.path for r in pages.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ()))


async def test_every_form_refuses_a_post_without_the_right_csrf_token_and_writes_nothing(
    browser: httpx.AsyncClient, services: Settings, pool: asyncpg.Pool
) -> None:
    forms = form_routes()
    assert forms == [
        "/informant-references/unlock",
        "/register/{slug}",
        "/register/{slug}/check",
        "/register/{slug}/organisations",
        "/sign-in",
        "/sign-out",
        "/start",
    ], "a new form: give it a body below"
    username = await signed_in(browser, pool)
    check = await to_check_page(browser, death_answers())
    submission = _SUBMISSION_ID.search(check.text)
    assert submission
    session_before = await pool.fetchrow(
        "SELECT data::text AS data FROM web_session WHERE username = $1", username
    )
    other = await new_registrar(pool)  # who the sign-in form is posted for
    sign_in_token = csrf(await browser.get("/sign-in"))
    right = {"/sign-in": sign_in_token}
    bodies: dict[str, dict[str, str]] = {
        "/informant-references/unlock": {"reference": "TUO-2026-AAAA-BBBB", "checked": "yes"},
        "/register/{slug}": death_answers(),
        "/register/{slug}/check": {"submission_id": submission.group(1)},
        "/register/{slug}/organisations": {"consent.dvla": "given", "consent.hmpo": "given"},
        "/sign-in": {"username": other, "password": PASSWORD},
        "/sign-out": {},
        "/start": {"event": "death"},
    }
    for form in forms:
        token = right.get(form, csrf(check))
        wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        attempts: list[tuple[dict[str, str], dict[str, str]]] = [
            ({}, {}),  # no token
            ({"csrf_token": wrong}, {}),
            (
                {"csrf_token": token},
                {"Sec-Fetch-Site": "cross-site"},
            ),  # the right token, sent by another site
        ]
        for extra, headers in attempts:
            response = await browser.post(
                form.replace("{slug}", "death"), data={**bodies[form], **extra}, headers=headers
            )
            assert response.status_code == 403, (form, extra, headers, response.text[:200])
            assert "Sorry, this form could not be accepted" in response.text
            assert "Nothing has been recorded" in response.text
    assert await records_by(pool, username) == 0
    session_after = await pool.fetchrow(
        "SELECT data::text AS data FROM web_session WHERE username = $1", username
    )
    assert session_after == session_before, "still signed in, the draft as it was"
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", other) == 0
    assert await pool.fetchval("SELECT count(*) FROM sign_in_failure WHERE username = $1", other) == 0


# Sessions that end on the server


def session_cookie(client: httpx.AsyncClient) -> str:
    value = client.cookies.get(SESSION_COOKIE)
    assert value, "no session cookie"
    return value


async def replay(web: str, cookie: str, path: str = "/start") -> httpx.Response:
    """What someone holding a copy of the cookie gets (the browser itself may have dropped it)."""
    async with httpx.AsyncClient(base_url=web, cookies={SESSION_COOKIE: cookie}) as client:
        return await client.get(path)


@pytest.mark.parametrize(
    ("column", "age"),
    [("last_seen_at", "31 minutes"), ("created_at", "10 hours 1 minute")],
    ids=["idle", "max-age"],
)
async def test_an_expired_session_is_sent_to_sign_in_and_ended_on_the_server(
    browser: httpx.AsyncClient, web: str, pool: asyncpg.Pool, column: str, age: str
) -> None:
    username = await signed_in(browser, pool)
    await to_check_page(browser, death_answers())
    cookie = session_cookie(browser)
    await pool.execute(
        f"UPDATE web_session SET {column} = now() - $2::text::interval WHERE username = $1", username, age
    )
    response = await replay(web, cookie, "/register/death/check")
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?next=%2Fregister%2Fdeath%2Fcheck&reason=expired"
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
    assert (await replay(web, cookie)).headers[
        "location"
    ] == "/sign-in?next=%2Fstart"  # no session at all now


async def test_signing_out_ends_the_session_on_the_server_not_just_in_the_browser(
    browser: httpx.AsyncClient, web: str, pool: asyncpg.Pool
) -> None:
    username = await signed_in(browser, pool)
    cookie = session_cookie(browser)
    token = await session_token(browser)
    assert (await browser.post("/sign-out", data={"csrf_token": token})).status_code == 303
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
    assert (await replay(web, cookie)).headers["location"] == "/sign-in?next=%2Fstart"
    async with httpx.AsyncClient(base_url=web, cookies={SESSION_COOKIE: cookie}) as copy:
        posted = await copy.post("/start", data={"csrf_token": token, "event": "death"})
    assert posted.headers["location"] == "/sign-in"


# Each office sees only its own events


async def test_an_event_is_not_found_by_another_office_on_the_api_or_the_pages(
    bus: RunningBus, web: str, pool: asyncpg.Pool, intake: httpx.AsyncClient, leeds_event: str
) -> None:
    bradford = await issue_token(pool, "bradford", "supervisor", f"bradford {uuid.uuid4().hex[:8]}")
    headers = {"Authorization": f"Bearer {bradford}"}
    elsewhere = await intake.get(f"/v1/events/{leeds_event}", headers=headers)
    unknown = await intake.get(f"/v1/events/{UNKNOWN_REFERENCE}", headers=headers)
    assert elsewhere.status_code == unknown.status_code == 404
    assert elsewhere.json() == unknown.json(), "the answer does not reveal that the reference exists"
    assert (await intake.get(f"/v1/events/{leeds_event}")).status_code == 200  # Leeds sees its own

    leeds_registrar = f"leeds-{uuid.uuid4().hex[:10]}"
    await add_registrar(pool, leeds_registrar, "Lee Registrar", "leeds", "registrar", PASSWORD)
    for username, seen in ((leeds_registrar, 200), (await new_registrar(pool), 404)):
        async with httpx.AsyncClient(base_url=web, timeout=20) as client:
            assert (await sign_in(client, username)).status_code == 303
            for path in (f"/registrations/{leeds_event}", f"/registrations/{leeds_event}/agencies"):
                assert (await client.get(path)).status_code == seen, (username, path)
            if seen == 404:
                page = await client.get(f"/registrations/{leeds_event}")
                assert "Page not found" in page.text and leeds_event not in page.text


async def test_metrics_need_a_monitoring_token_which_can_do_nothing_else(
    bus: RunningBus, intake: httpx.AsyncClient, pool: asyncpg.Pool, monitoring_token: str, leeds_event: str
) -> None:
    anonymous = await intake.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    supervisor = await issue_token(pool, "leeds", "supervisor", f"supervisor {uuid.uuid4().hex[:8]}")
    for token in (None, supervisor):  # None: the registrar token the client already sends
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        refused = await intake.get("/metrics", headers=headers)
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert "tuo_receipts" not in refused.text
    monitor = {"Authorization": f"Bearer {monitoring_token}"}
    scraped = await intake.get("/metrics", headers=monitor)
    assert scraped.status_code == 200 and "# TYPE tuo_receipts_total counter" in scraped.text
    written = await pool.fetchval("SELECT count(*) FROM intake_record")
    submitted = await intake.post("/v1/death-registrations", json=death_registration(), headers=monitor)
    looked_up = await intake.get(f"/v1/events/{leeds_event}", headers=monitor)
    assert submitted.status_code == looked_up.status_code == 403
    assert await pool.fetchval("SELECT count(*) FROM intake_record") == written


async def test_tuo_tokens_issues_a_monitoring_token_that_reads_the_metrics(
    services: Settings, intake: httpx.AsyncClient
) -> None:
    label = f"prometheus {uuid.uuid4().hex[:8]}"
    code, output = await asyncio.to_thread(
        tuo_cli, services, "tokens", "issue", "--office", "leeds", "--label", label, "--role", "monitoring"
    )
    assert code == 0, output
    token = re.search(r"tuo_[A-Za-z0-9_-]{40,}", output)
    assert token and "monitoring at leeds" in output
    scraped = await intake.get("/metrics", headers={"Authorization": f"Bearer {token.group(0)}"})
    assert scraped.status_code == 200
    code, output = await asyncio.to_thread(
        tuo_cli,
        services,
        *("users", "add", "nobody.monitor", "--office", "leeds", "--name", "N", "--role", "monitoring"),
        *("--password-stdin",),
        input=PASSWORD + "\n",
    )
    assert code != 0 and "role must be one of: registrar, supervisor, agent" in output  # not monitors


# A request allowance per client


@contextlib.contextmanager
def rate_limit_log() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as logs:
        refusals: list[dict[str, Any]] = []
        yield refusals
    refusals.extend(dict(e) for e in logs if e["event"] == "http_rate_limited")


async def test_an_api_client_over_its_allowance_gets_429_and_others_are_still_served(
    services: Settings, pool: asyncpg.Pool
) -> None:
    first = await issue_token(pool, "leeds", "registrar", f"busy {uuid.uuid4().hex[:8]}")
    second = await issue_token(pool, "leeds", "registrar", f"quiet {uuid.uuid4().hex[:8]}")
    async with web_server(services, pool, api_rate_limit_per_minute=5) as base_url:
        with rate_limit_log() as refusals:
            async with httpx.AsyncClient(
                base_url=base_url, headers={"Authorization": f"Bearer {first}"}
            ) as busy:
                # The first request counts against the address: the token is not known until accepted.
                served = [(await busy.get(f"/v1/events/{UNKNOWN_REFERENCE}")).status_code for _ in range(6)]
                refused = await busy.get(f"/v1/events/{UNKNOWN_REFERENCE}")
            async with httpx.AsyncClient(
                base_url=base_url, headers={"Authorization": f"Bearer {second}"}
            ) as quiet:
                other = await quiet.get(f"/v1/events/{UNKNOWN_REFERENCE}")
    assert served == [404] * 6
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["status"] == 429 and refused.json()["title"] == "Too many requests"
    retry_after = int(refused.headers["retry-after"])
    assert 0 < retry_after <= 12  # five a minute: one back every 12 s
    assert_protected(refused, https=False)
    assert other.status_code == 404, "another client of the same address is still served"
    assert refusals == [
        {
            "event": "http_rate_limited",
            "log_level": "warning",
            "client": "api",
            "limit": "requests",
            "retry_after": retry_after,
        }
    ]


async def test_a_system_with_a_token_has_a_larger_allowance_than_a_person_or_an_address(
    services: Settings, pool: asyncpg.Pool
) -> None:
    """A system submitting a backlog is not held to what a registrar at a desk needs."""
    token = await issue_token(pool, "leeds", "registrar", f"backlog {uuid.uuid4().hex[:8]}")
    async with web_server(services, pool, http_rate_limit_per_minute=3, api_rate_limit_per_minute=12) as base:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}) as system:
            # The first counts against the address: the token is not known until accepted.
            by_system = [(await system.get(f"/v1/events/{UNKNOWN_REFERENCE}")).status_code for _ in range(14)]
        async with httpx.AsyncClient(base_url=base) as anonymous:
            by_address = [(await anonymous.get("/v1/events/x")).status_code for _ in range(3)]
    assert by_system == [404] * 13 + [429], "1 against the address, then the token's 12"
    assert by_address == [401, 401, 429], "the address had used 1 of its 3"


async def test_made_up_tokens_share_their_addresss_allowance(services: Settings, pool: asyncpg.Pool) -> None:
    async with web_server(services, pool, http_rate_limit_per_minute=5) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            statuses = [
                (await client.get("/v1/events/x", headers={"Authorization": f"Bearer tuo_{n}"})).status_code
                for n in range(6)
            ]
    assert statuses == [401] * 5 + [429]


async def test_sign_in_attempts_are_limited_per_address_more_strictly_than_other_requests(
    services: Settings, pool: asyncpg.Pool
) -> None:
    username = await new_registrar(pool)
    async with web_server(services, pool, sign_in_attempts_per_minute=3) as base_url:
        with rate_limit_log() as refusals:
            async with httpx.AsyncClient(base_url=base_url) as client:
                wrong = [(await sign_in(client, username, "not the password")).status_code for _ in range(3)]
                refused = await sign_in(client, username)  # the right password, but too many attempts
                page = await client.get("/sign-in")  # other requests are not limited as strictly
    assert wrong == [422] * 3
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert 0 < retry_after <= 20  # three a minute: one back every 20 s
    assert "<title>Sorry, there have been too many attempts to sign in – Tell Us Once</title>" in refused.text
    assert '<h1 class="govuk-heading-l">' in refused.text and "govuk-template" in refused.text
    assert f"Wait {retry_after} second{'s' if retry_after > 1 else ''}, then try again." in refused.text
    assert_protected(refused, https=False)
    assert "'nonce-" in refused.headers["content-security-policy"]
    assert page.status_code == 200
    assert await pool.fetchval("SELECT count(*) FROM web_session WHERE username = $1", username) == 0
    assert await pool.fetchval("SELECT failures FROM sign_in_failure WHERE username = $1", username) == 3
    assert refusals == [
        {
            "event": "http_rate_limited",
            "log_level": "warning",
            "client": "address",
            "limit": "sign-in attempts",
            "retry_after": retry_after,
        }
    ], "the kind of client and the limit; not who, nor from where"


async def test_a_signed_in_registrar_over_the_allowance_gets_a_page_saying_when_to_try_again(
    services: Settings, pool: asyncpg.Pool
) -> None:
    async with web_server(services, pool, http_rate_limit_per_minute=6) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            await signed_in(client, pool)  # two requests, counted against the address
            statuses = [(await client.get("/start")).status_code for _ in range(7)]
            refused = await client.get("/start")
    assert statuses == [200] * 7  # the first against the address, then six as the registrar
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert 0 < retry_after <= 10
    assert "Sorry, there have been too many requests" in refused.text
    assert f"Wait {retry_after} second{'s' if retry_after > 1 else ''}, then try again." in refused.text
    assert 'href="/start"' in refused.text


async def test_starting_citizen_sign_ins_counts_against_the_sign_in_allowance(
    services: Settings, pool: asyncpg.Pool
) -> None:
    """Each GET /citizen/sign-in starts a sign-in (a database row): limited like sign-in posts."""
    assert services.oidc_issuer is not None, "the local stack names an identity provider"
    async with web_server(services, pool, sign_in_attempts_per_minute=3) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            statuses = [(await client.get("/citizen/sign-in")).status_code for _ in range(4)]
            other = await client.get("/citizen/signed-out")
    assert statuses == [303, 303, 303, 429]
    assert other.status_code == 200, "other pages are not limited as strictly"


async def test_a_database_out_of_reach_is_a_503_to_try_again_not_a_500(services: Settings) -> None:
    # A pool whose server is not there (PostgreSQL restarting): nothing listens on this port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = await asyncpg.create_pool(f"postgresql://tuo:x@127.0.0.1:{port}/tuo", min_size=0)
    app = create_app(web_settings(services), gone)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://intake") as client,
        ):
            api = await client.post(
                "/v1/death-registrations",
                json={},
                headers={"Authorization": "Bearer tuo_not-checked-yet", "Idempotency-Key": "k-1"},
            )
            client.cookies.set("tuo-session", "a-session-the-database-would-look-up")
            page = await client.get("/start", headers={"Accept": "text/html"})
    finally:
        await gone.close()
    assert api.status_code == 503 and api.headers["retry-after"] == "5"
    assert api.headers["content-type"].startswith("application/problem+json")
    assert "same Idempotency-Key" in api.json()["detail"]
    assert_protected(api, https=False)
    assert page.status_code == 503 and page.headers["retry-after"] == "5"
    assert "Sorry, the service is unavailable for a moment" in page.text
    assert_protected(page, https=False)
