"""Each registration office's Ed25519 signing key: created with the office,
rotated on demand, the active one used to sign every event the office records.

Private keys live in PostgreSQL next to the intake records they sign, sealed
with the data key (``runtime.sealing``, AES-256-GCM, bound to the key id) as
consent-receipt keys are: reading the database alone is not enough to forge an
office's signature. Public keys (active and retired) are published by the key
registry.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from runtime.notices import NoticedCache, Notices
from runtime.sealing import CannotOpen, PayloadSealer


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    office: str
    private_key: Ed25519PrivateKey


class NoSigningKey(LookupError):
    """The office has no active signing key (add it with `tuo offices add`)."""


class OfficeKeyUnavailable(RuntimeError):
    """The office's active key is stored, but the configured data keys cannot open it."""


async def create_key(conn: asyncpg.Connection, office: str, sealer: PayloadSealer) -> str:
    """Make a new active key for the office, retiring the one it had; return its id."""
    private = Ed25519PrivateKey.generate()
    key_id = f"{office}.{secrets.token_hex(4)}"
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    async with conn.transaction():
        await conn.execute(
            # clock_timestamp(), not the transaction's start: an event whose recording held
            # the old key (store.stale_signing_keys) is then always recorded before it retired.
            "UPDATE office_signing_key SET retired_at = clock_timestamp()"
            " WHERE office = $1 AND retired_at IS NULL",
            office,
        )
        await conn.execute(
            "INSERT INTO office_signing_key (key_id, office, public_key, sealed_private_key)"
            " VALUES ($1, $2, $3, $4)",
            key_id,
            office,
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            # Bound to the key id, so a sealed key moved to another row does not open.
            sealer.seal(raw_private, key_id.encode()),
        )
    return key_id


async def active_key(
    pool: asyncpg.Pool | asyncpg.Connection, office: str, sealer: PayloadSealer
) -> SigningKey:
    key = await _active_key(pool, office, sealer)
    if key is None:
        raise NoSigningKey(office)
    return key


async def _active_key(
    pool: asyncpg.Pool | asyncpg.Connection, office: str, sealer: PayloadSealer
) -> SigningKey | None:
    row = await pool.fetchrow(
        "SELECT key_id, sealed_private_key FROM office_signing_key WHERE office = $1 AND retired_at IS NULL",
        office,
    )
    if row is None:
        return None
    key_id: str = row["key_id"]
    try:
        raw = sealer.open(bytes(row["sealed_private_key"]), key_id.encode())
    except CannotOpen as exc:
        raise OfficeKeyUnavailable(
            f"office {office}'s signing key {key_id} cannot be opened with the configured data keys: "
            "add the data key it was sealed with to TUO_DATA_KEYS_PREVIOUS"
        ) from exc
    return SigningKey(key_id, office, Ed25519PrivateKey.from_private_bytes(raw))


OFFICE_KEYS_CHANNEL = "tuo_office_keys"  # migration 0026's trigger NOTIFYs here


class ActiveKeys:
    """Each office's active key, opened and parsed once and remembered while ``notices``
    listens on ``OFFICE_KEYS_CHANNEL``: a rotation (from any process) is announced there,
    so the next event is signed with the new key. An event signed with a key retired
    before its notice arrived is refused when it is stored (``store.StaleSigningKey``)
    and signed again, so none is ever recorded after its key's retirement."""

    def __init__(self, pool: asyncpg.Pool, sealer: PayloadSealer, notices: Notices) -> None:
        self._cache: NoticedCache[str, SigningKey] = notices.cache(
            OFFICE_KEYS_CHANNEL, functools.partial(_active_key, pool, sealer=sealer)
        )

    @property
    def lookups(self) -> int:
        return self._cache.lookups

    def forget(self) -> None:
        """Drop every remembered key (one was found retired before its notice arrived)."""
        self._cache.forget()

    async def of(self, office: str) -> SigningKey:
        key = await self._cache.get(office)
        if key is None:
            raise NoSigningKey(office)
        return key
