"""Signatures on ``ConsentChanged`` messages, so that an agency told of a withdrawal
can check that the consent service said so, not the broker or anyone who can write
to its topic.

The format is the one the offices use on life events (``schemas.signatures``): the
same three headers, a manifest of salted digests, Ed25519. Here every field of the
record is one item and every salt is disclosed (an agency receives the whole
message). What differs is who signs: the consent service, with the key that signs
consent receipts (``router.consent_receipts``, published as a JWKS at
``GET /consent-receipts/keys``), never an office. So the manifest's ``event_type``
is ``ConsentChanged``, its ``event_id`` the change id, ``ce_source`` is
``/consent``, and the key must be one the consent key set holds (the caller passes
it as an ``OfficeKey`` whose ``office`` is ``CONSENT_SERVICE``): an office key
cannot sign a consent change, and the consent key cannot sign a life event.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.codec import decode, encode
from schemas.signatures import (
    KafkaHeaders,
    OfficeKey,
    SignatureRejected,
    SignedEvent,
    UnsignableValue,
    digest,
    sign_items,
)

CONSENT_CHANGED = "ConsentChanged"
CONSENT_SOURCE = "/consent"  # the CloudEvents source of every consent change
CONSENT_SERVICE = "consent-service"  # the owner named on consent keys in a key ring


class ConsentSigner(Protocol):
    """The consent service's signing key (``router.consent_receipts.consent_signer``)."""

    @property
    def key_id(self) -> str: ...

    @property
    def private_key(self) -> Ed25519PrivateKey: ...


def sign_consent_change(key: ConsentSigner, record: Mapping[str, Any]) -> SignedEvent:
    """Sign a ConsentChanged record as fastavro reads it back (a UUID given as text,
    a time in another zone, sign as the agency will decode them)."""
    _, decoded = decode(encode(CONSENT_CHANGED, dict(record)))
    return sign_items(key.key_id, key.private_key, str(decoded["change_id"]), CONSENT_CHANGED, decoded)


def consent_signature_headers(key: ConsentSigner, record: Mapping[str, Any]) -> KafkaHeaders:
    return sign_consent_change(key, record).headers()


def verify_consent_change(
    signed: SignedEvent, key: OfficeKey | None, *, event_id: str, source: str, body: Mapping[str, Any]
) -> None:
    """Check that ``body`` is exactly what the consent service signed, with a key of
    its own that was not retired when the change was recorded. Raises
    SignatureRejected with the reason."""
    manifest = signed.manifest
    if key is None or key.key_id != manifest.key_id:
        raise SignatureRejected(f"signing key {manifest.key_id!r} is not a consent service key")
    if key.office != CONSENT_SERVICE:
        raise SignatureRejected(f"key {key.key_id} belongs to {key.office}, not to the consent service")
    if not key.verifies(signed.signature, signed.manifest_bytes):
        raise SignatureRejected(f"the signature does not verify with key {key.key_id}")
    if manifest.event_type != CONSENT_CHANGED:
        raise SignatureRejected(
            f"the consent service signed a {manifest.event_type}, not a {CONSENT_CHANGED}"
        )
    if manifest.event_id != event_id:
        raise SignatureRejected(f"the consent service signed change {manifest.event_id}, not {event_id}")
    matched: set[str] = set()
    for name, value in body.items():
        salt = signed.salts.get(name)
        if salt is None:
            raise SignatureRejected(f"{name} is not covered by the signature (no salt)")
        try:
            found = digest(salt, name, value)
        except UnsignableValue as exc:
            raise SignatureRejected(f"{name}: {exc}") from None
        if found not in manifest.digests:
            raise SignatureRejected(f"{name} is not what the consent service signed (digest mismatch)")
        matched.add(found)
    if matched != manifest.digests:
        raise SignatureRejected(f"{len(manifest.digests - matched)} signed item(s) are missing")
    # The body is now known to be the consent service's own.
    if str(body.get("change_id")) != event_id:
        raise SignatureRejected("the signed change id is not the message's ce_id")
    if source != CONSENT_SOURCE:
        raise SignatureRejected(f"ce_source is {source}, not {CONSENT_SOURCE}")
    recorded_at = body.get("recorded_at")
    if not isinstance(recorded_at, datetime):
        raise SignatureRejected("the consent change has no recorded_at time")
    if not key.signed_before_retirement(recorded_at):
        raise SignatureRejected(f"key {key.key_id} was retired at {key.retired_at}, before the change")
