"""The API documentation page, ``/docs``: Swagger UI over this service's OpenAPI
document, with Swagger UI's script, stylesheet and icon served by this service from
its npm package (``swagger-ui-dist``; ``npm ci`` puts it in node_modules/), not from
a CDN. The page therefore works where the service cannot reach the internet, and
its Content-Security-Policy (``runtime.web.security_headers.documentation_page``)
lets it load nothing from any other origin.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.responses import FileResponse

from runtime.settings import Settings
from runtime.web.security_headers import ASSETS_PREFIX, documentation_page

log = structlog.get_logger(__name__)

SWAGGER_UI = Path(__file__).resolve().parents[1] / "node_modules" / "swagger-ui-dist"
ASSETS = f"{ASSETS_PREFIX}swagger-ui/"  # under /assets/: cacheable, like GOV.UK Frontend's
SCRIPT, STYLESHEET, ICON = "swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"


def install_api_docs(app: FastAPI, settings: Settings, openapi_url: str = "/openapi.json") -> None:
    """``GET /docs`` and the three files it loads. Call it before anything mounts
    ``/assets`` as a whole (``producers.web.install_web``), which would hide them."""
    folder = settings.swagger_ui_dir or SWAGGER_UI
    if (folder / SCRIPT).is_file():
        for name in (SCRIPT, STYLESHEET, ICON):
            app.add_api_route(ASSETS + name, _file(folder / name), include_in_schema=False)
    else:
        # /openapi.json still answers; the page itself stays blank until the assets are there.
        log.error("swagger_ui_missing", path=str(folder), fix="run `npm ci` in the project")

    @app.get("/docs", include_in_schema=False)
    async def api_documentation() -> HTMLResponse:
        return documentation_page(
            get_swagger_ui_html(
                openapi_url=openapi_url,
                title=f"{app.title} API",
                swagger_js_url=ASSETS + SCRIPT,
                swagger_css_url=ASSETS + STYLESHEET,
                swagger_favicon_url=ASSETS + ICON,
                # Swagger UI would otherwise send the whole document to validator.swagger.io.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )


def _file(path: Path) -> Callable[[], FileResponse]:
    def serve() -> FileResponse:
        return FileResponse(path)

    return serve
