"""Citizens sign in through OpenID Connect: the relying party against the development
provider, over real HTTP, with sessions in the real PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from structlog.testing import capture_logs

from citizens.signin import install_citizen_sign_in
from devstack import dev_idp
from devstack.dev_idp import TEST_IDENTITIES, bind_loopback, new_signing_key, s256
from operators.services import RunningBus
from runtime.pseudonyms import subject_id_for
from runtime.settings import Settings
from tests.citizen_browser import (
    CLIENT_ID,
    CLIENT_SECRET,
    Stack,
    browser,
    serve_citizens,
    sign_in,
    to_callback,
    whoami,
)

pytestmark = pytest.mark.integration

JO, CHRIS, _ = TEST_IDENTITIES


@pytest.fixture(scope="module")
async def stack(services: Settings, pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    async with serve_citizens(services, pool) as (base_url, idp, settings):
        yield Stack(base_url, idp, settings)


def with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return parts._replace(query=urlencode(query)).geturl()


async def test_citizen_signs_in_and_is_known_by_a_pseudonymous_subject_id(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    async with browser() as client:
        done = await sign_in(client, stack, JO.sub)
        assert done.status_code == 303 and done.headers["location"] == "/citizen/me"
        me = await whoami(client, stack)
    assert me.status_code == 200
    expected = subject_id_for("CE654321A", stack.settings.require_pseudonym_key())
    assert me.json()["subject_id"] == expected
    assert me.json()["name"] == "Jo Citizen"
    assert await pool.fetchval("SELECT count(*) FROM citizen_session WHERE subject_id = $1", expected) >= 1


async def test_another_identity_gets_another_subject_id(stack: Stack) -> None:
    async with browser() as jo, browser() as chris:
        await sign_in(jo, stack, JO.sub)
        await sign_in(chris, stack, CHRIS.sub)
        jo_subject = (await whoami(jo, stack)).json()["subject_id"]
        chris_subject = (await whoami(chris, stack)).json()["subject_id"]
    assert chris_subject == subject_id_for("CE112233D", stack.settings.require_pseudonym_key())
    assert jo_subject != chris_subject


async def test_without_a_session_a_page_sends_the_citizen_to_sign_in(stack: Stack) -> None:
    async with browser() as client:
        answer = await whoami(client, stack)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/citizen/sign-in?next=/citizen/me"


@pytest.mark.parametrize("state", ["tampered", None])
async def test_a_tampered_or_absent_state_is_refused(stack: Stack, state: str | None) -> None:
    async with browser() as client:
        callback = await to_callback(client, stack, JO.sub)
        answer = await client.get(with_query(callback, state=state))
        assert answer.status_code == 400
        assert "tuo-citizen" not in answer.cookies
        assert (await whoami(client, stack)).status_code == 303


async def test_a_callback_from_another_browser_is_refused(stack: Stack) -> None:
    async with browser() as victim, browser() as attacker:
        callback = await to_callback(attacker, stack, JO.sub)
        answer = await victim.get(callback)
        assert answer.status_code == 400
        assert (await whoami(victim, stack)).status_code == 303


async def test_a_replayed_code_is_refused(stack: Stack) -> None:
    async with browser() as client:
        callback = await to_callback(client, stack, JO.sub)
        assert (await client.get(callback)).status_code == 303
        # The same answer again: its state is spent.
        assert (await client.get(callback)).status_code == 400
    async with browser() as client:
        # The old code with a fresh, genuine state: the provider refuses the code.
        fresh = await to_callback(client, stack, JO.sub)
        old_code = parse_qs(urlsplit(callback).query)["code"][0]
        answer = await client.get(with_query(fresh, code=old_code))
        assert answer.status_code == 400
        assert (await whoami(client, stack)).status_code == 303


async def test_an_id_token_signed_with_a_key_the_provider_does_not_publish_is_refused(stack: Stack) -> None:
    genuine = stack.idp.signing_key
    stack.idp.signing_key = new_signing_key()
    try:
        async with browser() as client:
            with capture_logs() as logs:
                answer = await sign_in(client, stack, JO.sub)
            assert answer.status_code == 400
            assert (await whoami(client, stack)).status_code == 303
        assert any(event["event"] == "citizen_sign_in_refused" for event in logs)
    finally:
        stack.idp.signing_key = genuine


async def test_a_provider_that_rotates_its_published_key_is_still_believed(stack: Stack) -> None:
    stack.idp.rotate_key()
    async with browser() as client:
        assert (await sign_in(client, stack, CHRIS.sub)).status_code == 303
        assert (await whoami(client, stack)).status_code == 200


async def test_sign_out_ends_the_session_on_the_server(stack: Stack, pool: asyncpg.Pool) -> None:
    async with browser() as client:
        await sign_in(client, stack, JO.sub)
        token = client.cookies["tuo-citizen"]
        csrf = (await whoami(client, stack)).json()["csrf"]
        refused = await client.post(f"{stack.base_url}/citizen/sign-out", data={"csrf_token": "wrong"})
        assert refused.status_code == 403
        out = await client.post(f"{stack.base_url}/citizen/sign-out", data={"csrf_token": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/citizen/signed-out"
    hashed = hashlib.sha256(token.encode()).digest()
    assert await pool.fetchval("SELECT count(*) FROM citizen_session WHERE token_hash = $1", hashed) == 0
    # The old cookie, kept by someone who copied it, opens nothing.
    async with browser() as copy:
        copy.cookies.set("tuo-citizen", token)
        assert (await whoami(copy, stack)).status_code == 303


async def test_the_nino_is_neither_logged_nor_stored(stack: Stack, pool: asyncpg.Pool) -> None:
    with capture_logs() as logs:
        async with browser() as client:
            await sign_in(client, stack, JO.sub)
            assert (await whoami(client, stack)).status_code == 200
    assert logs and "CE654321A" not in repr(logs)
    for table in ("citizen_session", "citizen_sign_in"):
        rows = await pool.fetch(f"SELECT t::text AS row FROM {table} t")
        assert not any("CE654321A" in row["row"] for row in rows)


# The development provider's own refusals.


def authorize_params(stack: Stack, **changes: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": CLIENT_ID,
        "redirect_uri": f"{stack.base_url}/citizen/callback",
        "response_type": "code",
        "scope": "openid",
        "state": "s",
        "nonce": "n",
        "code_challenge": s256("v" * 64),
        "code_challenge_method": "S256",
        **changes,
    }
    return {key: value for key, value in params.items() if value is not None}


async def test_the_provider_refuses_unknown_clients_and_unregistered_redirects(stack: Stack) -> None:
    async with browser() as client:
        for changes in ({"client_id": "someone-else"}, {"redirect_uri": "https://evil.example/callback"}):
            answer = await client.get(
                f"{stack.idp.issuer}/authorize", params=authorize_params(stack, **changes)
            )
            assert answer.status_code == 400  # a page, never a redirect to the unverified address


@pytest.mark.parametrize(
    "changes",
    [{"code_challenge": None}, {"code_challenge_method": "plain"}, {"nonce": None}],
    ids=["no-challenge", "plain-pkce", "no-nonce"],
)
async def test_the_provider_refuses_requests_without_pkce_s256_or_nonce(
    stack: Stack, changes: dict[str, str | None]
) -> None:
    async with browser() as client:
        answer = await client.get(f"{stack.idp.issuer}/authorize", params=authorize_params(stack, **changes))
    assert answer.status_code == 303
    assert "error=invalid_request" in answer.headers["location"]


async def code_for(client: httpx.AsyncClient, stack: Stack) -> str:
    chosen = await client.post(
        f"{stack.idp.issuer}/authorize", data={**authorize_params(stack), "identity": JO.sub}
    )
    return parse_qs(urlsplit(chosen.headers["location"]).query)["code"][0]


async def exchange(client: httpx.AsyncClient, stack: Stack, code: str, verifier: str) -> httpx.Response:
    return await client.post(
        f"{stack.idp.issuer}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": f"{stack.base_url}/citizen/callback",
            "code_verifier": verifier,
        },
        auth=(CLIENT_ID, CLIENT_SECRET),
    )


async def test_the_provider_refuses_a_wrong_verifier_a_reused_code_and_an_expired_code(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with browser() as client:
        wrong = await exchange(client, stack, await code_for(client, stack), "w" * 64)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        code = await code_for(client, stack)
        first = await exchange(client, stack, code, "v" * 64)
        assert first.status_code == 200
        assert (await exchange(client, stack, code, "v" * 64)).status_code == 400
        # The reuse revoked the access token the code had given.
        info = await client.get(
            f"{stack.idp.issuer}/userinfo",
            headers={"Authorization": f"Bearer {first.json()['access_token']}"},
        )
        assert info.status_code == 401
        monkeypatch.setattr(dev_idp, "CODE_LIFETIME_SECONDS", -1)
        expired = await exchange(client, stack, await code_for(client, stack), "v" * 64)
        assert expired.status_code == 400 and expired.json()["error_description"] == "code expired"


async def test_the_running_service_signs_citizens_in_at_the_local_stacks_identity_provider(
    services: Settings, pool: asyncpg.Pool, bus: RunningBus
) -> None:
    """`tuo run` on the local stack: the development provider runs beside the intake
    service, registered for it, and a sign-in there lands back here with a session."""
    base = f"http://127.0.0.1:{bus.http_port}"
    assert services.oidc_issuer is not None
    async with browser() as client:
        start = await client.get(f"{base}/citizen/sign-in")
        assert start.status_code == 303
        authorize = start.headers["location"]
        assert authorize.startswith(f"{services.oidc_issuer}/authorize?")
        params = {key: values[0] for key, values in parse_qs(urlsplit(authorize).query).items()}
        chosen = await client.post(f"{services.oidc_issuer}/authorize", data={**params, "identity": JO.sub})
        assert chosen.status_code == 303 and chosen.headers["location"].startswith(
            f"{base}/citizen/callback?"
        )
        # The production cookies are Secure, which httpx keeps off plain http (browsers
        # treat 127.0.0.1 as secure): hand the sign-in cookie back as a browser would.
        browser_cookie = start.headers["set-cookie"].split(";", 1)[0]
        done = await client.get(chosen.headers["location"], headers={"Cookie": browser_cookie})
        assert done.status_code == 303, done.text
        assert "__Host-" in done.headers["set-cookie"] and "Secure" in done.headers["set-cookie"]
    subject = subject_id_for(JO.nino, services.require_pseudonym_key())
    assert await pool.fetchval("SELECT count(*) FROM citizen_session WHERE subject_id = $1", subject) >= 1


async def test_an_unreachable_provider_gives_a_try_again_page_not_a_server_error(
    services: Settings, pool: asyncpg.Pool
) -> None:
    nobody = bind_loopback()  # bound but never answering: a port nothing serves
    port = nobody.getsockname()[1]
    nobody.close()
    settings = services.model_copy(
        update={
            "oidc_issuer": f"http://127.0.0.1:{port}",
            "oidc_client_id": "tuo-test",
            "oidc_client_secret": SecretStr("not-used"),
            "dev_idp_port": None,
            "session_cookie_secure": False,
        }
    )
    app = FastAPI()
    install_citizen_sign_in(app, settings, pool)
    started = await pool.fetchval("SELECT count(*) FROM citizen_sign_in")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tuo") as client:
        response = await client.get("/citizen/sign-in")
    assert response.status_code == 503
    assert "Sign-in is not available right now" in response.text
    assert await pool.fetchval("SELECT count(*) FROM citizen_sign_in") == started, "nothing half-started"
