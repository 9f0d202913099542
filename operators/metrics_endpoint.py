"""The Prometheus endpoint every process of the bus serves on ``TUO_METRICS_PORT``.

``GET /metrics`` answers with this process's registry (``runtime.metrics``) to a
monitoring system's bearer token, checked against PostgreSQL like the intake's
``/metrics``: the counters name agencies and how much each was told, which is
not for anyone on the network to read.
"""

from __future__ import annotations

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from producers.accounts import token_holder
from runtime.metrics import CONTENT_TYPE, process_metrics

PROBLEM = "application/problem+json"


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    response = JSONResponse(body, status_code=status, media_type=PROBLEM)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="tuo-metrics"'
    return response


def metrics_app(pool: asyncpg.Pool) -> Starlette:
    async def metrics(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        holder = await token_holder(pool, token.strip()) if scheme.lower() == "bearer" else None
        if holder is None:
            return _problem(
                401, "Sign-in required", "Send a monitoring token: Authorization: Bearer <token>."
            )
        if holder.role != "monitoring":
            return _problem(
                403,
                "Not permitted",
                "reading metrics needs a monitoring token (tuo tokens issue --role monitoring)",
            )
        return Response(await process_metrics(), media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
