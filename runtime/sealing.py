"""Personal data at rest: outbox payloads (and registrars' draft answers in their web
sessions) are sealed with AES-256-GCM in the application.

The outbox holds every life event, with names, dates of birth, NINOs and
addresses, until (and after) the relay publishes it. PostgreSQL's own files,
backups and replicas therefore carry only ciphertext; reading an event needs the
data key as well as the database.

A sealed value is ``0x01 | key id (8 bytes) | nonce (12 bytes) | ciphertext+tag``.
The key id is the first 8 bytes of the key's SHA-256, so a value names the key
that sealed it: keys rotate by moving the old key to ``TUO_DATA_KEYS_PREVIOUS``
and setting a new ``TUO_DATA_KEY`` — on the relay first, then on intake, so the
relay can open whatever intake seals. The event id is bound in as associated data,
so a payload moved to another event's row does not open. Nothing unsealed is
accepted: a value that is not sealed is refused, so writing plain rows into the
database cannot slip an unauthenticated event past the relay.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runtime.settings import MissingSetting, Settings

SEALED = b"\x01"
KEY_ID_BYTES = 8
NONCE_BYTES = 12


class CannotOpen(RuntimeError):
    """A sealed value that no configured key opens: wrong key, or the bytes were altered."""


def new_data_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _key_bytes(encoded: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(encoded.encode())
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a data key is 32 random bytes in URL-safe base64") from exc
    if len(key) != 32:
        raise ValueError("a data key is 32 random bytes in URL-safe base64")
    return key


def _associated(bound_to: UUID | bytes) -> bytes:
    return bound_to.bytes if isinstance(bound_to, UUID) else bound_to


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


class PayloadSealer:
    def __init__(self, current: str, previous: list[str] | None = None) -> None:
        key = _key_bytes(current)
        self._current = (_key_id(key), AESGCM(key))
        self._keys = {self._current[0]: self._current[1]}
        for old in previous or []:
            old_key = _key_bytes(old)
            self._keys.setdefault(_key_id(old_key), AESGCM(old_key))

    @classmethod
    def from_settings(cls, settings: Settings) -> PayloadSealer:
        if settings.data_key is None:
            raise MissingSetting(
                "data_key",
                "the local stack generates one; elsewhere set 32 random bytes in URL-safe base64 "
                "(python -c 'import runtime.sealing as s; print(s.new_data_key())')",
            )
        return cls(
            settings.data_key.get_secret_value(),
            [key.get_secret_value() for key in settings.data_keys_previous],
        )

    def seal(self, plaintext: bytes, bound_to: UUID | bytes) -> bytes:
        """Encrypt ``plaintext``, bound to its owner (an event id, a session's token hash)."""
        key_id, cipher = self._current
        nonce = os.urandom(NONCE_BYTES)
        return SEALED + key_id + nonce + cipher.encrypt(nonce, plaintext, _associated(bound_to))

    def open(self, stored: bytes, bound_to: UUID | bytes) -> bytes:
        event_id = bound_to if isinstance(bound_to, UUID) else "(session data)"
        if stored[:1] != SEALED:
            raise CannotOpen(f"event {event_id}: the stored payload is not sealed")
        key_id = stored[1 : 1 + KEY_ID_BYTES]
        nonce = stored[1 + KEY_ID_BYTES : 1 + KEY_ID_BYTES + NONCE_BYTES]
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise CannotOpen(
                f"event {event_id}: sealed with a key that is not configured "
                "(add it to TUO_DATA_KEYS_PREVIOUS)"
            )
        try:
            return cipher.decrypt(nonce, stored[1 + KEY_ID_BYTES + NONCE_BYTES :], _associated(bound_to))
        except InvalidTag as exc:
            raise CannotOpen(f"event {event_id}: the sealed payload was altered or moved") from exc
