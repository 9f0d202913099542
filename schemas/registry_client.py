"""Use an existing Confluent-compatible schema registry instead of the committed ids.

At start-up every released version is registered under its subject (the
registry answers with the id it already has for an identical schema), and the
process then encodes and decodes with those ids. Registration in version order
passes a registry's BACKWARD/FULL compatibility rules because ``tuo schemas
check`` already proved the versions FULL_TRANSITIVE compatible.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import structlog

from schemas.catalogue import SchemaCatalogue

log = structlog.get_logger(__name__)


class RegistryRefused(RuntimeError):
    """The external registry would not register or find one of our schemas."""


async def bind_to_registry(
    url: str,
    catalogue: SchemaCatalogue,
    client: httpx.AsyncClient | None = None,
    auth: tuple[str, str] | None = None,
) -> SchemaCatalogue:
    owned = client is None
    http = client or httpx.AsyncClient(timeout=10, auth=auth)
    ids: dict[tuple[str, int], int] = {}
    try:
        for entry in catalogue.entries():
            endpoint = f"{url.rstrip('/')}/subjects/{quote(entry.subject, safe='')}/versions"
            try:
                response = await http.post(
                    endpoint,
                    json={"schema": entry.schema_json, "schemaType": "AVRO"},
                    headers={"content-type": "application/vnd.schemaregistry.v1+json"},
                )
            except httpx.HTTPError as exc:
                raise RegistryRefused(f"cannot reach the schema registry at {url}: {exc}") from exc
            if response.status_code != 200 or not isinstance(response.json().get("id"), int):
                raise RegistryRefused(
                    f"the schema registry at {url} refused {entry.subject} v{entry.version}: "
                    f"HTTP {response.status_code} {response.text[:300]}"
                )
            ids[(entry.name, entry.version)] = response.json()["id"]
    finally:
        if owned:
            await http.aclose()
    log.info("schema_registry_bound", url=url, schemas=len(ids))
    return catalogue.with_ids(ids)
