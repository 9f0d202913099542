"""Rendering pages: the Jinja environment with the GOV.UK Frontend macros, and the
content security policy the pages satisfy: scripts from this service only, plus
the GOV.UK template's one inline line, allowed by a per-response nonce. (No
caching, no framing and the other headers every response gets are set in
``runtime.web.security_headers``.)"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from jinja2 import (
    ChainableUndefined,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    PrefixLoader,
    select_autoescape,
)
from starlette.responses import HTMLResponse, RedirectResponse, Response

from runtime.web import i18n

SERVICE_NAME = i18n.N_("Tell Us Once")

_GOVUK = PrefixLoader({"govuk_frontend_jinja": PackageLoader("govuk_frontend_jinja")})
environment = Environment(
    loader=ChoiceLoader([FileSystemLoader(Path(__file__).parent / "templates"), _GOVUK]),
    autoescape=select_autoescape(["html"], default=True),
    # The GOV.UK macros read options that may be absent (params.hint.text): absent is empty.
    undefined=ChainableUndefined,
    extensions=["jinja2.ext.i18n"],
)
# _() in a template: in the language of the request being served (runtime.web.i18n).
environment.install_gettext_callables(i18n.gettext, i18n.ngettext, newstyle=True)  # type: ignore[attr-defined]
environment.filters["long_date"] = i18n.long_date


def add_templates(folder: Path) -> None:
    """A part of the service (the registrars' pages, the citizens' pages) adds its own
    templates; one environment renders them all, with the GOV.UK Frontend macros."""
    loader = environment.loader
    assert isinstance(loader, ChoiceLoader)
    if not any(
        isinstance(each, FileSystemLoader) and str(folder) in each.searchpath for each in loader.loaders
    ):
        loader.loaders = [*loader.loaders[:-1], FileSystemLoader(folder), _GOVUK]


def content_security_policy(nonce: str) -> str:
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src 'self' 'nonce-{nonce}'",
            "style-src 'self'",
            "img-src 'self'",
            "font-src 'self'",
            "connect-src 'self'",
            "manifest-src 'self'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "object-src 'none'",
        ]
    )


def protect(response: Response, nonce: str | None = None) -> Response:
    """The page's own content security policy; the headers every response gets (no
    caching, no framing, no referrer, ...) are added by ``runtime.web.security_headers``."""
    response.headers["Content-Security-Policy"] = content_security_policy(nonce or secrets.token_urlsafe(16))
    return response


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    html = environment.get_template(template).render(
        cspNonce=nonce, serviceName=SERVICE_NAME, htmlLang=i18n.language.get(), **context
    )
    response = HTMLResponse(html, status_code=status_code)
    protect(response, nonce)
    return response


def redirect(location: str) -> RedirectResponse:
    """303 See Other: after a POST, the browser fetches the next page with GET."""
    response = RedirectResponse(location, status_code=303)
    protect(response)
    return response
