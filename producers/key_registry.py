"""The key registry: every registration office's public signing keys, active and
retired, over HTTP, so that anyone can check an event's office signature
without trusting the broker (see ``schemas.signatures``).

``GET /v1/signing-keys`` answers a JSON list of ``{key_id, office, algorithm,
public_key (base64url, 32 bytes), created_at, retired_at}``;
``GET /.well-known/jwks.json`` serves the same keys as a JSON Web Key Set
(RFC 8037 ``OKP``/``Ed25519`` keys), with ``office``, ``created_at`` and
``retired_at`` as extra members. A retired key still verifies events recorded
before ``retired_at``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from runtime.keyring import CACHE_SECONDS, office_keys
from schemas.signatures import OfficeKey


def _jwk(key: OfficeKey) -> dict[str, Any]:
    published = key.to_json()
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "use": "sig",
        "kid": key.key_id,
        "x": published["public_key"],
        "office": key.office,
        "created_at": published["created_at"],
        "retired_at": published["retired_at"],
    }


def key_registry_router(pool: Callable[[], asyncpg.Pool]) -> APIRouter:
    """The registry's endpoints; ``pool`` gives the database pool when a request comes."""
    router = APIRouter(tags=["signing keys"])
    headers = {"Cache-Control": f"public, max-age={CACHE_SECONDS}"}

    @router.get("/v1/signing-keys", summary="Registration offices' public signing keys")
    async def signing_keys() -> JSONResponse:
        return JSONResponse([key.to_json() for key in await office_keys(pool())], headers=headers)

    @router.get("/.well-known/jwks.json", summary="The same keys as a JSON Web Key Set")
    async def jwks() -> JSONResponse:
        return JSONResponse(
            {"keys": [_jwk(key) for key in await office_keys(pool())]},
            headers=headers,
            media_type="application/jwk-set+json",
        )

    return router
