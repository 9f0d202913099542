"""The registrars' HTML forms, in the GOV.UK Design System style.

``install_web`` adds the pages (the router ``routes.pages``), their error pages
and their static assets to the intake app: GOV.UK Frontend's stylesheet,
script, fonts and images from its npm package (``npm ci`` puts it in
node_modules/; scripts/setup.sh runs it), and this service's own small script
and stylesheet. The pages live outside ``/v1/``, which is the JSON API's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import structlog
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from producers.dependencies import running_intake
from producers.web.routes import AgentsTakeCalls, FormNotTrusted, SignInRequired, cookie_policy, pages
from runtime.settings import Settings
from runtime.web.pages import add_templates, redirect, render
from runtime.web.sessions import PHONE_JOURNEY_PATH, STAFF_SIGN_OUT_PATH

__all__ = ["GOVUK_FRONTEND", "install_web", "too_many_requests_page", "wants_html"]

log = structlog.get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GOVUK_FRONTEND = PROJECT_ROOT / "node_modules" / "govuk-frontend" / "dist" / "govuk"
STATIC = Path(__file__).parent / "static"
add_templates(Path(__file__).parent / "templates")
WEB_PATHS = ("/sign-in", STAFF_SIGN_OUT_PATH, "/start", "/register", "/registrations", "/assets")


def install_web(app: FastAPI, settings: Settings) -> None:
    """Mount the registrars' pages and assets on the intake app (once; a second call does nothing).
    The pages use the app's ``state.intake`` (``producers.dependencies``)."""
    if getattr(app.state, "web_installed", False):
        return
    app.state.web_installed = True
    app.include_router(pages)
    _install_assets(app, settings.govuk_frontend_dir or GOVUK_FRONTEND)
    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(AgentsTakeCalls, to_the_phone_journey)
    app.add_exception_handler(FormNotTrusted, form_not_trusted)
    app.add_exception_handler(404, not_found)
    app.add_exception_handler(Exception, server_error)


def _install_assets(app: FastAPI, govuk_frontend: Path) -> None:
    if not (govuk_frontend / "govuk-frontend.min.css").is_file():
        # The pages still work without styles or scripts; say loudly how to get them.
        log.error("govuk_frontend_missing", path=str(govuk_frontend), fix="run `npm ci` in the project")
        return
    for name in ("govuk-frontend.min.css", "govuk-frontend.min.js"):
        app.add_api_route(f"/assets/{name}", _file(govuk_frontend / name), include_in_schema=False)
    app.mount("/assets/app", StaticFiles(directory=STATIC), name="web-assets")
    # Fonts and images, where GOV.UK Frontend's stylesheet expects them: /assets/fonts, /assets/images.
    app.mount("/assets", StaticFiles(directory=govuk_frontend / "assets"), name="govuk-frontend-assets")


def _file(path: Path) -> Callable[[], FileResponse]:
    def serve() -> FileResponse:
        return FileResponse(path)

    return serve


def wants_html(path: str, accept: str) -> bool:
    """Whether a request is a browser's, to be answered with a page rather than JSON."""
    if path.startswith(WEB_PATHS) or path == "/":
        return True
    return "text/html" in accept and not path.startswith("/v1/")


def _wants_html(request: Request) -> bool:
    return wants_html(request.url.path, request.headers.get("accept", ""))


def too_many_requests_page(path: str, retry_after: int) -> Response:
    """429 for a browser that has sent too many requests (or sign-ins) for now."""
    wait = f"Wait {_wait(retry_after)}, then try again."
    if path.startswith("/sign-in"):
        return render(
            "message.html",
            429,
            title="Sorry, there have been too many attempts to sign in",
            lines=[f"You have not been signed in. {wait}"],
            link=("/sign-in", "Go to sign in"),
        )
    return render(
        "message.html",
        429,
        title="Sorry, there have been too many requests",
        lines=[
            f"Nothing has been recorded. {wait}",
            "If you were sending a registration, sending it again will not record it twice.",
        ],
        link=("/start", "Go to the start"),
    )


async def to_the_phone_journey(request: Request, exc: Exception) -> Response:
    """An agent's session on a registrar's page: their own are the telephone journey's."""
    return redirect(PHONE_JOURNEY_PATH)


def unavailable_page(retry_after: int) -> Response:
    """503 for a browser while the service's database is out of reach (a restart)."""
    return render(
        "message.html",
        503,
        title="Sorry, the service is unavailable for a moment",
        lines=[
            f"Wait {_wait(retry_after)}, then try again.",
            "If you were sending a registration, sending it again will not record it twice.",
        ],
        link=("/start", "Go to the start"),
    )


def _wait(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = -(-seconds // 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


# The pages' error pages, registered by ``install_web``.


async def sign_in_required(request: Request, exc: Exception) -> Response:
    """To the sign-in page, and back here afterwards; the stale session cookie goes."""
    assert isinstance(exc, SignInRequired)
    query = {}
    if exc.return_to:
        query["next"] = exc.return_to
    if exc.expired:
        query["reason"] = "expired"
    response = redirect("/sign-in" + (f"?{urlencode(query)}" if query else ""))
    cookies = cookie_policy(running_intake(request))
    cookies.clear(response, cookies.session)
    return response


async def form_not_trusted(_: Request, __: Exception) -> Response:
    log.warning("web_form_refused", reason="missing or wrong CSRF token")
    return render(
        "message.html",
        403,
        title="Sorry, this form could not be accepted",
        lines=[
            "It was out of date, or it was not sent from this service. Nothing has been recorded.",
            "Go back to the start, then try again.",
        ],
        link=("/start", "Go to the start"),
    )


async def not_found(request: Request, exc: Exception) -> Response:
    if not _wants_html(request):
        assert isinstance(exc, HTTPException)
        return await http_exception_handler(request, exc)
    return render(
        "message.html",
        404,
        title="Page not found",
        lines=[
            "If you typed the web address, check it is correct.",
            "If you are looking for a registration, check the reference number: "
            "you can only see registrations your own office recorded.",
        ],
        link=("/start", "Go to the start"),
    )


async def server_error(request: Request, _: Exception) -> Response:
    if not _wants_html(request):
        return PlainTextResponse("Internal Server Error", status_code=500)  # as without this handler
    return render(
        "message.html",
        500,
        title="Sorry, there is a problem with the service",
        lines=[
            "Try again in a few minutes. If you were sending a registration, sending it again "
            "will not record it twice.",
        ],
        link=("/start", "Go to the start"),
    )
