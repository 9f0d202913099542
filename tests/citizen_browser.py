"""Serving the citizens' side over real HTTP with the development OIDC provider, and
signing in from a test's own browser (an httpx client with its cookie jar)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import uvicorn
from fastapi import Depends, FastAPI
from pydantic import SecretStr

from citizens.signin import Citizen, current_citizen, install_citizen_sign_in
from devstack.dev_idp import DevIdentityProvider, RegisteredClient, bind_loopback, running_dev_idp
from runtime.settings import Settings

CLIENT_ID = "tuo-test"
CLIENT_SECRET = "test-client-secret-" + uuid.uuid4().hex

Installer = Callable[[FastAPI, Settings, asyncpg.Pool], None]


@dataclass
class Stack:
    base_url: str
    idp: DevIdentityProvider
    settings: Settings


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_citizens(
    settings: Settings, pool: asyncpg.Pool, *installers: Installer
) -> AsyncIterator[tuple[str, DevIdentityProvider, Settings]]:
    """A service with the citizens' sign-in, ``/citizen/me`` and whatever ``installers``
    add, beside the development provider, each on a free port."""
    sock = bind_loopback()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with running_dev_idp(
        [RegisteredClient(CLIENT_ID, CLIENT_SECRET, frozenset({f"{base_url}/citizen/callback"}))]
    ) as idp:
        settings = settings.model_copy(
            update={
                "session_cookie_secure": False,  # httpx keeps Secure cookies off plain http
                "oidc_issuer": idp.issuer,
                "oidc_client_id": CLIENT_ID,
                "oidc_client_secret": SecretStr(CLIENT_SECRET),
                "oidc_redirect_url": f"{base_url}/citizen/callback",
            }
        )
        app = FastAPI()
        install_citizen_sign_in(app, settings, pool)
        for install in installers:
            install(app, settings, pool)

        @app.get("/citizen/me")
        async def me(citizen: Citizen = Depends(current_citizen)) -> dict[str, str]:  # noqa: B008
            return {
                "subject_id": citizen.subject_id,
                "name": citizen.display_name,
                "csrf": citizen.csrf_token,
            }

        server = _EmbeddedServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving
            await asyncio.sleep(0.05)
        try:
            yield base_url, idp, settings
        finally:
            server.should_exit = True
            await serving
            sock.close()


def browser() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10, follow_redirects=False)


async def to_callback(client: httpx.AsyncClient, stack: Stack, identity: str) -> str:
    """Start signing in and choose ``identity`` at the provider; the callback URL it sends back."""
    start = await client.get(f"{stack.base_url}/citizen/sign-in?next=/citizen/me")
    assert start.status_code == 303
    authorize = start.headers["location"]
    assert authorize.startswith(f"{stack.idp.issuer}/authorize?")
    page = await client.get(authorize)
    assert page.status_code == 200 and "Sign in as Jo Citizen" in page.text
    params = {key: values[0] for key, values in parse_qs(urlsplit(authorize).query).items()}
    chosen = await client.post(f"{stack.idp.issuer}/authorize", data={**params, "identity": identity})
    assert chosen.status_code == 303
    callback = chosen.headers["location"]
    assert callback.startswith(f"{stack.base_url}/citizen/callback?")
    return callback


async def sign_in(client: httpx.AsyncClient, stack: Stack, identity: str) -> httpx.Response:
    return await client.get(await to_callback(client, stack, identity))


async def whoami(client: httpx.AsyncClient, stack: Stack) -> httpx.Response:
    return await client.get(f"{stack.base_url}/citizen/me")
