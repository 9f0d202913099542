"""The schema catalogue over HTTP, speaking the Confluent Schema Registry API,
so that any standard client (confluent-kafka's ``SchemaRegistryClient``, Kafka
UIs, kcat wrappers) can fetch the writer schema of any message by its id.

Read endpoints serve the catalogue. The two write endpoints answer only for
schemas the catalogue already holds (look-up and idempotent registration, which
is what serialisers call); anything else is refused, because versions are
released by ``tuo schemas freeze`` and committed, never registered at run time.
Errors use the registry's own shape: ``{"error_code": …, "message": …}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastavro.schema import SchemaParseException

from schemas.catalogue import CatalogueEntry, SchemaCatalogue, UnknownSchema, active, canonical_form

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"

# Confluent's error codes, so clients raise the errors their users expect.
SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402
SCHEMA_NOT_FOUND = 40403
INVALID_SCHEMA = 42201
INVALID_VERSION = 42202
READ_ONLY = 40301

MAX_SCHEMA_CHARS = 1_000_000  # far above any real schema; bounds the work a request can cause


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status, media_type=MEDIA_TYPE)


def _ok(body: Any) -> JSONResponse:
    return JSONResponse(body, media_type=MEDIA_TYPE)


def _describe(entry: CatalogueEntry) -> dict[str, Any]:
    return {
        "subject": entry.subject,
        "version": entry.version,
        "id": entry.schema_id,
        "schema": entry.schema_json,
    }


def registry_router(fixed: SchemaCatalogue | None = None) -> APIRouter:
    """Serve ``fixed``, or else whichever catalogue is active when a request comes."""
    router = APIRouter(tags=["schema registry"])

    def current() -> SchemaCatalogue:
        return fixed or active()

    def versions_of(subject: str) -> list[CatalogueEntry] | None:
        if not subject.startswith("uk.gov.tellusonce."):
            return None
        try:
            return current().versions(subject)
        except UnknownSchema:
            return None

    def same_schema(candidate: str) -> CatalogueEntry | None:
        if len(candidate) > MAX_SCHEMA_CHARS:
            return None
        try:
            wanted = canonical_form(json.loads(candidate))
        except (RecursionError, SchemaParseException, ValueError, TypeError, KeyError, AttributeError):
            return None  # not an Avro schema we could hold
        for entry in current().entries():
            if entry.canonical_form == wanted:
                return entry
        return None

    def by_id(schema_id: str) -> CatalogueEntry | JSONResponse:
        if not (schema_id.isascii() and schema_id.isdigit() and len(schema_id) <= 10):
            return _error(404, SCHEMA_NOT_FOUND, f"Schema {schema_id[:20]} not found")
        try:
            return current().by_id(int(schema_id))
        except UnknownSchema:
            return _error(404, SCHEMA_NOT_FOUND, f"Schema {schema_id} not found")

    @router.get("/schemas/ids/{schema_id}")
    async def schema_by_id(schema_id: str) -> JSONResponse:
        entry = by_id(schema_id)
        return entry if isinstance(entry, JSONResponse) else _ok({"schema": entry.schema_json})

    @router.get("/schemas/ids/{schema_id}/versions")
    async def subject_versions_of_id(schema_id: str) -> JSONResponse:
        entry = by_id(schema_id)
        if isinstance(entry, JSONResponse):
            return entry
        return _ok([{"subject": entry.subject, "version": entry.version}])

    @router.get("/subjects")
    async def subjects() -> JSONResponse:
        return _ok(sorted(current().latest(name).subject for name in current().names()))

    @router.get("/subjects/{subject}/versions")
    async def versions(subject: str) -> JSONResponse:
        found = versions_of(subject)
        if found is None:
            return _error(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.")
        return _ok([e.version for e in found])

    def find(subject: str, version: str) -> CatalogueEntry | JSONResponse:
        found = versions_of(subject)
        if found is None:
            return _error(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.")
        if version in ("latest", "-1"):
            return found[-1]
        if not (version.isascii() and version.isdigit() and len(version) <= 9) or int(version) < 1:
            return _error(
                422, INVALID_VERSION, f"The specified version '{version}' is not a valid version id."
            )
        for entry in found:
            if entry.version == int(version):
                return entry
        return _error(404, VERSION_NOT_FOUND, f"Version {version} not found.")

    @router.get("/subjects/{subject}/versions/{version}")
    async def version(subject: str, version: str) -> JSONResponse:
        entry = find(subject, version)
        return entry if isinstance(entry, JSONResponse) else _ok(_describe(entry))

    @router.get("/subjects/{subject}/versions/{version}/schema")
    async def raw_schema(subject: str, version: str) -> JSONResponse:
        entry = find(subject, version)
        return entry if isinstance(entry, JSONResponse) else _ok(entry.schema)

    async def _posted_schema(request: Request) -> str | JSONResponse:
        """The body's schema text, or the registry's 422 for a body that has none."""
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            body = None
        schema = body.get("schema") if isinstance(body, dict) else None
        if isinstance(schema, str):
            return schema
        return _error(422, INVALID_SCHEMA, 'Request body must be {"schema": "<Avro schema as JSON text>"}')

    @router.post("/subjects/{subject}")
    async def look_up(subject: str, request: Request) -> JSONResponse:
        """Is this schema registered under this subject? (what serialisers ask)"""
        if versions_of(subject) is None:
            return _error(404, SUBJECT_NOT_FOUND, f"Subject '{subject}' not found.")
        schema = await _posted_schema(request)
        if isinstance(schema, JSONResponse):
            return schema
        entry = same_schema(schema)
        if entry is None or entry.subject != subject:
            return _error(404, SCHEMA_NOT_FOUND, "Schema not found")
        return _ok(_describe(entry))

    @router.post("/subjects/{subject}/versions")
    async def register(subject: str, request: Request) -> JSONResponse:
        """Idempotent registration of a schema the catalogue already has; others are refused."""
        schema = await _posted_schema(request)
        if isinstance(schema, JSONResponse):
            return schema
        entry = same_schema(schema)
        if entry is None or entry.subject != subject:
            return _error(
                403,
                READ_ONLY,
                "This registry serves the committed catalogue and is read-only; release new schema "
                "versions with `tuo schemas freeze`.",
            )
        return _ok({"id": entry.schema_id})

    return router
