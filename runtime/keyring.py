"""The registration offices' public keys, as the router and agencies need them to
verify signed events (see ``schemas.signatures``).

A ``KeyRing`` keeps the keys it has read. It reads them again when asked for a
key id it does not know (at most once per call, so a batch costs one read) or
when its copy is older than ``max_age_seconds`` (so a retirement is noticed).
An id still unknown after that read is not in the registry: the caller rejects
the event. The keys come from the intake service's key registry over HTTP (any
agency) or straight from PostgreSQL (components that share the bus's database).
A registry that cannot be reached is an error, never a rejection: events are
not dead-lettered because the registry was down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import httpx
import structlog

from schemas.consent_signatures import CONSENT_SERVICE
from schemas.signatures import PUBLIC_KEY_BYTES, OfficeKey, b64decode

log = structlog.get_logger(__name__)

SIGNING_KEYS_PATH = "/v1/signing-keys"
# router.consent_receipts.KEYS_PATH: the consent service's keys, as a JWKS.
CONSENT_KEYS_PATH = "/consent-receipts/keys"
DEFAULT_MAX_AGE_SECONDS = 60.0

CACHE_SECONDS = 60  # how long a client may keep published keys: a new key is fetched on demand anyway


async def office_keys(pool: asyncpg.Pool) -> list[OfficeKey]:
    """Every office's published key, ready to verify with."""
    rows = await pool.fetch(
        "SELECT key_id, office, public_key, created_at, retired_at FROM office_signing_key ORDER BY key_id"
    )
    return [
        OfficeKey.from_raw(r["key_id"], r["office"], bytes(r["public_key"]), r["created_at"], r["retired_at"])
        for r in rows
    ]


class KeyRegistryUnavailable(RuntimeError):
    """The key registry could not be read, or answered with something that is not a key list."""


class KeySource(Protocol):
    async def fetch(self) -> list[OfficeKey]: ...


class DatabaseKeySource:
    """Keys read from the bus's database (the router, the reference agencies)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self) -> list[OfficeKey]:
        return await office_keys(self.pool)


class HttpKeySource:
    """Keys read from the key registry, ``GET <intake public URL>/v1/signing-keys``."""

    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None, timeout: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + SIGNING_KEYS_PATH
        self.client = client
        self.timeout = timeout

    async def fetch(self) -> list[OfficeKey]:
        document = await _get_json(self.url, self.client, self.timeout)
        if not isinstance(document, list):
            raise KeyRegistryUnavailable(f"{self.url} did not answer with a list of keys")
        try:
            return [OfficeKey.from_json(entry) for entry in document]
        except ValueError as exc:
            raise KeyRegistryUnavailable(f"{self.url}: {exc}") from exc


async def _get_json(url: str, client: httpx.AsyncClient | None, seconds: float) -> Any:
    """The JSON document at ``url``; KeyRegistryUnavailable when it cannot be had."""
    try:
        if client is not None:
            response = await client.get(url, timeout=seconds)
        else:
            async with httpx.AsyncClient(timeout=seconds) as own:
                response = await own.get(url)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise KeyRegistryUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc


class ConsentKeySource:
    """The consent service's keys (which sign consent receipts and ConsentChanged
    messages), read from the bus's database, each as an ``OfficeKey`` whose office is
    ``CONSENT_SERVICE``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def fetch(self) -> list[OfficeKey]:
        rows = await self.pool.fetch(
            "SELECT key_id, public_key, created_at, retired_at FROM consent_receipt_key"
        )
        return [
            OfficeKey.from_raw(
                r["key_id"], CONSENT_SERVICE, bytes(r["public_key"]), r["created_at"], r["retired_at"]
            )
            for r in rows
        ]


class HttpConsentKeySource:
    """The consent service's keys from its JWKS, ``GET <public URL>/consent-receipts/keys``."""

    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None, timeout: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + CONSENT_KEYS_PATH
        self.client = client
        self.timeout = timeout

    async def fetch(self) -> list[OfficeKey]:
        document = await _get_json(self.url, self.client, self.timeout)
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise KeyRegistryUnavailable(f"{self.url} did not answer with a JSON Web Key Set")
        try:
            return [_consent_key(entry) for entry in keys]
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyRegistryUnavailable(f"{self.url}: {exc}") from exc


def _consent_key(entry: dict[str, object]) -> OfficeKey:
    if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
        raise ValueError(f"key {entry.get('kid')!r} is not an Ed25519 key")
    key_id = entry["kid"]
    if not isinstance(key_id, str):
        raise ValueError("a key has no kid")
    retired = entry.get("retired_at")
    return OfficeKey.from_raw(
        key_id,
        CONSENT_SERVICE,
        b64decode(entry.get("x"), PUBLIC_KEY_BYTES, f"key {key_id}'s x"),
        datetime.fromisoformat(str(entry["created_at"])),
        None if retired is None else datetime.fromisoformat(str(retired)),
    )


class KeyRing:
    def __init__(
        self,
        source: KeySource,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self.reads = 0
        self._keys: dict[str, OfficeKey] = {}
        self._read_at: float | None = None
        self._lock = asyncio.Lock()  # concurrent callers share one read

    @classmethod
    def from_database(cls, pool: asyncpg.Pool) -> KeyRing:
        return cls(DatabaseKeySource(pool))

    @classmethod
    def over_http(cls, base_url: str) -> KeyRing:
        return cls(HttpKeySource(base_url))

    @classmethod
    def consent_from_database(cls, pool: asyncpg.Pool) -> KeyRing:
        """The consent service's keys, for verifying ConsentChanged messages."""
        return cls(ConsentKeySource(pool))

    @classmethod
    def consent_over_http(cls, base_url: str) -> KeyRing:
        """The consent service's keys from its published JWKS (an agency elsewhere)."""
        return cls(HttpConsentKeySource(base_url))

    async def resolve(self, key_ids: Iterable[str]) -> dict[str, OfficeKey]:
        """The known keys among ``key_ids``; an id missing from the answer is unknown."""
        wanted = set(key_ids)
        async with self._lock:
            stale = self._read_at is None or self.clock() - self._read_at > self.max_age_seconds
            if stale or not wanted <= self._keys.keys():
                await self._read()
        return {key_id: self._keys[key_id] for key_id in wanted if key_id in self._keys}

    async def _read(self) -> None:
        keys = await self.source.fetch()
        self._keys = {key.key_id: key for key in keys}
        self._read_at = self.clock()
        self.reads += 1
        log.debug("signing_keys_read", keys=len(keys))
