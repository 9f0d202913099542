"""The headers every response of the intake service carries, set in one place.

``SecurityHeaders`` wraps the whole app (errors included), so JSON, problem
details, pages, the schema and key registries, static assets and metrics all
get them. A response that sets its own Content-Security-Policy keeps it (the
registrars' pages carry a per-response nonce, the API documentation a policy of
its own that, too, allows only this origin); the rest get one that allows
nothing, which is right for JSON and text. Nothing but static assets may be
stored by a browser or proxy: the rest can carry personal data or session state.
"""

from __future__ import annotations

import re
import secrets

from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ASSETS_PREFIX = "/assets/"
HSTS = "max-age=31536000; includeSubDomains"
NOTHING_ALLOWED = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
PERMISSIONS = (
    "accelerometer=(), autoplay=(), camera=(), display-capture=(), geolocation=(), gyroscope=(),"
    " magnetometer=(), microphone=(), payment=(), usb=(), browsing-topics=()"
)


def security_headers(path: str, present: set[bytes], *, https: bool) -> list[tuple[bytes, bytes]]:
    """Headers to add to a response for ``path`` that already has the ``present`` ones
    (lower-case names): the policy, as data, so it can be read and tested on its own."""
    headers = [
        (b"x-content-type-options", b"nosniff"),
        # Addresses carry reference numbers; do not hand them to other sites.
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
        (b"permissions-policy", PERMISSIONS.encode()),
    ]
    if b"content-security-policy" not in present:
        headers.append((b"content-security-policy", NOTHING_ALLOWED.encode()))
    if b"cache-control" not in present and not path.startswith(ASSETS_PREFIX):
        headers.append((b"cache-control", b"no-store"))
    if https:
        headers.append((b"strict-transport-security", HSTS.encode()))
    return [(name, value) for name, value in headers if name not in present]


class SecurityHeaders:
    """ASGI middleware adding ``security_headers`` to every HTTP response."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _ in headers}
                message["headers"] = headers + security_headers(path, present, https=self.https)
            await send(message)

        await self.app(scope, receive, send_with_headers)


_SCRIPT = re.compile(r"<script(?=[\s>])")


def documentation_page(page: HTMLResponse) -> HTMLResponse:
    """FastAPI's Swagger UI page (``producers.api_docs``, its assets served by this
    service) with a policy of its own that allows only this origin: its inline
    start-up script runs by a per-response nonce (never 'unsafe-inline'), and it may
    fetch nothing but this service's OpenAPI document."""
    nonce = secrets.token_urlsafe(16)
    html = _SCRIPT.sub(f'<script nonce="{nonce}"', bytes(page.body).decode())
    html = html.replace("<html>", '<html lang="en">', 1)  # FastAPI's page names no language
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' 'nonce-{nonce}'",
            "style-src 'self'",
            "img-src 'self' data:",  # Swagger UI's stylesheet draws its icons as data: SVGs
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )
    return HTMLResponse(html, status_code=page.status_code, headers={"Content-Security-Policy": policy})
