"""Consent receipts: every consent change (given, refused, withdrawn) is answered
with a receipt in the shape of the Kantara Initiative Consent Receipt
Specification v1.1, signed as a JWT that anyone can check against the published
keys.

A receipt is a compact JWS (RFC 7515) whose header is ``{"alg": "Ed25519",
"kid": <RFC 7638 thumbprint>, "typ": "JWT"}`` (``Ed25519`` is the fully specified
name for EdDSA over Ed25519, RFC 9864) and whose claims are the Kantara fields —
``piiPrincipalId`` is the pseudonymous subject id, never a NINO or a name; the
controller is Tell Us Once; the one service/purpose is telling one agency about
one type of event, ``consentType`` ``EXPLICIT`` — plus the JWT claims ``iss``,
``sub``, ``iat`` and ``jti`` (the receipt id), and ``consentChange``, which says
what Kantara has no field for: the choice, who recorded it, exactly when, and the
agency and event type in machine form.

The signing key lives in PostgreSQL (``consent_receipt_key``), made on first use;
its private half is sealed with the data key (``runtime.sealing``), bound to the
key id. Rotation retires the active key and makes a new one; retired public keys
stay in the JWKS served at ``GET /consent-receipts/keys``, so old receipts still
verify, and a receipt dated after its key's retirement does not.

The same key signs the ``ConsentChanged`` messages that tell agencies of a
withdrawal (``schemas.consent_signatures``, ``router.consent_changes``), so agencies
check them against this same published key set.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import OKPKey

from producers.key_registry import CACHE_SECONDS
from runtime.sealing import CannotOpen, PayloadSealer
from runtime.settings import Settings
from schemas.signatures import PUBLIC_KEY_BYTES, b64decode, b64encode

ALGORITHM = "Ed25519"
KANTARA_VERSION = "KI-CR-v1.1.0"
JURISDICTION = "GB"
LANGUAGE = "en"
KEYS_PATH = "/consent-receipts/keys"

ConsentChoice = Literal["given", "refused", "withdrawn"]
RecordedBy = Literal["informant", "citizen", "proxy"]

CHOICES: frozenset[str] = frozenset({"given", "refused", "withdrawn"})
COLLECTION_METHODS: dict[str, str] = {
    "citizen": "Online, by the citizen on the Tell Us Once consent page",
    "proxy": "Online, by a proxy the citizen appointed",
    "informant": "In person, by the informant at the register office desk",
}
# Kantara's PII categories (Appendix of v1.1) for what each event type carries.
PII_CATEGORIES: dict[str, list[str]] = {
    "BirthRegistered": ["1 - Biographical", "2 - Contact"],
    "DeathRegistered": ["1 - Biographical", "2 - Contact", "8 - Official ID"],
    "AddressChanged": ["1 - Biographical", "2 - Contact", "8 - Official ID"],
}
EVENT_NAMES: dict[str, str] = {
    "BirthRegistered": "birth registrations",
    "DeathRegistered": "death registrations",
    "AddressChanged": "changes of address",
}
# Placeholder contact details: to be replaced with the service's published ones.
CONTROLLER: dict[str, Any] = {
    "piiController": "Tell Us Once",
    "onBehalf": False,
    "contact": "Tell Us Once data protection officer",
    "address": {"addressCountry": "GB"},
    "email": "data-protection@tell-us-once.example",
    "phone": "+44 0000 000000",
}

# Pseudonymous subject ids as intake makes them (producers.accept.subject_id_for):
# anything else, a NINO or a name above all, is refused before it can be signed.
_SUBJECT_ID = re.compile(r"[ns]-[0-9a-f]{32}")
_AGENCY = re.compile(r"[a-z][a-z0-9-]{1,39}")
_EVENT_TYPE = re.compile(r"[A-Z][A-Za-z0-9]{1,59}")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_REQUIRED_CLAIMS = (
    "version",
    "jurisdiction",
    "consentTimestamp",
    "collectionMethod",
    "consentReceiptID",
    "language",
    "piiPrincipalId",
    "piiControllers",
    "policyUrl",
    "services",
    "sensitive",
    "consentChange",
)


class InvalidConsentReceipt(ValueError):
    """The token is not a consent receipt signed by one of the published keys, or it was altered."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"not a valid consent receipt: {reason}")
        self.reason = reason


class UnknownReceiptKey(InvalidConsentReceipt):
    """The receipt names a key the key set does not hold."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"signed with key {key_id!r}, which the key set does not hold "
            f"(fetch the current keys from GET {KEYS_PATH})"
        )
        self.key_id = key_id


class ReceiptKeyUnavailable(RuntimeError):
    """The active signing key is stored, but the configured data keys cannot open it."""


class NotPseudonymous(ValueError):
    """A receipt was asked for with something other than a pseudonymous subject id."""


@dataclass(frozen=True)
class ReceiptKey:
    key_id: str
    public_key: bytes  # raw 32 bytes
    created_at: datetime
    retired_at: datetime | None

    def to_jwk(self) -> dict[str, Any]:
        """The public key as a JWK (RFC 8037), with when it was made and retired."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": ALGORITHM,
            "use": "sig",
            "kid": self.key_id,
            "x": b64encode(self.public_key),
            "created_at": _timestamp(self.created_at),
            "retired_at": None if self.retired_at is None else _timestamp(self.retired_at),
        }


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _key_id(public_key: bytes) -> str:
    return OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": b64encode(public_key)}).thumbprint()


# --- the signing key -------------------------------------------------------------------------

# Serialises making and rotating keys, so two issuers starting at once make one key.
_KEY_LOCK = 0x7475_6F63_7270_6B31  # "tuocrpk1"


async def _insert_key(conn: asyncpg.Connection, sealer: PayloadSealer) -> str:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = _key_id(public)
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    await conn.execute(
        "INSERT INTO consent_receipt_key (key_id, public_key, sealed_private_key) VALUES ($1, $2, $3)",
        key_id,
        public,
        sealer.seal(raw_private, key_id.encode()),
    )
    return key_id


async def rotate_receipt_key(pool: asyncpg.Pool, settings: Settings) -> str:
    """Retire the active receipt key (it stays published) and make a new one; return its id."""
    sealer = PayloadSealer.from_settings(settings)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
        await conn.execute(
            "UPDATE consent_receipt_key SET retired_at = clock_timestamp() WHERE retired_at IS NULL"
        )
        return await _insert_key(conn, sealer)


async def _active_key(pool: asyncpg.Pool, sealer: PayloadSealer) -> tuple[str, Ed25519PrivateKey]:
    query = "SELECT key_id, sealed_private_key FROM consent_receipt_key WHERE retired_at IS NULL"
    row = await pool.fetchrow(query)
    if row is None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
            if await conn.fetchval("SELECT count(*) FROM consent_receipt_key WHERE retired_at IS NULL") == 0:
                await _insert_key(conn, sealer)
        row = await pool.fetchrow(query)
    assert row is not None  # made just above, and keys are only ever retired by making another
    key_id: str = row["key_id"]
    try:
        raw = sealer.open(bytes(row["sealed_private_key"]), key_id.encode())
    except CannotOpen as exc:
        raise ReceiptKeyUnavailable(
            f"the consent receipt key {key_id} cannot be opened with the configured data keys: "
            "add the data key it was sealed with to TUO_DATA_KEYS_PREVIOUS"
        ) from exc
    return key_id, Ed25519PrivateKey.from_private_bytes(raw)


@dataclass(frozen=True)
class ConsentSigningKey:
    """The active receipt key, which also signs the ConsentChanged messages that tell
    agencies of a withdrawal (``schemas.consent_signatures``): one published key set
    proves both."""

    key_id: str
    private_key: Ed25519PrivateKey


async def consent_signer(pool: asyncpg.Pool, settings: Settings) -> ConsentSigningKey:
    key_id, private = await _active_key(pool, PayloadSealer.from_settings(settings))
    return ConsentSigningKey(key_id, private)


async def consent_signer_within(conn: asyncpg.Connection, settings: Settings) -> ConsentSigningKey:
    """``consent_signer`` read on ``conn``, inside its caller's transaction (intake's,
    when an informant's refusal ends a consent): no second connection is taken."""
    sealer = PayloadSealer.from_settings(settings)
    query = "SELECT key_id, sealed_private_key FROM consent_receipt_key WHERE retired_at IS NULL"
    row = await conn.fetchrow(query)
    if row is None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
        row = await conn.fetchrow(query)
        if row is None:
            await _insert_key(conn, sealer)
            row = await conn.fetchrow(query)
    assert row is not None  # made just above
    key_id: str = row["key_id"]
    try:
        raw = sealer.open(bytes(row["sealed_private_key"]), key_id.encode())
    except CannotOpen as exc:
        raise ReceiptKeyUnavailable(
            f"the consent receipt key {key_id} cannot be opened with the configured data keys: "
            "add the data key it was sealed with to TUO_DATA_KEYS_PREVIOUS"
        ) from exc
    return ConsentSigningKey(key_id, Ed25519PrivateKey.from_private_bytes(raw))


async def receipt_keys(pool: asyncpg.Pool) -> list[ReceiptKey]:
    rows = await pool.fetch(
        "SELECT key_id, public_key, created_at, retired_at FROM consent_receipt_key ORDER BY created_at"
    )
    return [ReceiptKey(r["key_id"], bytes(r["public_key"]), r["created_at"], r["retired_at"]) for r in rows]


async def published_keys(pool: asyncpg.Pool) -> dict[str, Any]:
    """Every receipt key, active and retired, as a JSON Web Key Set: public halves only."""
    return {"keys": [key.to_jwk() for key in await receipt_keys(pool)]}


# --- issuing -----------------------------------------------------------------------------------


def receipt_claims(
    settings: Settings,
    *,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
    recorded_by: str,
    recorded_at: datetime,
    receipt_id: uuid.UUID,
    issued_at: datetime,
) -> dict[str, Any]:
    """The receipt's claims: the Kantara v1.1 fields for one consent change, and ``consentChange``."""
    if not _SUBJECT_ID.fullmatch(subject_id):
        raise NotPseudonymous(
            "a consent receipt names the subject by the pseudonymous subject id "
            "(n-… or s-… with 32 hex digits), never a NINO or a name"
        )
    if not _AGENCY.fullmatch(agency):
        raise ValueError(f"agency {agency!r} is not an agency code (lower case, like 'hmrc')")
    if not _EVENT_TYPE.fullmatch(event_type):
        raise ValueError(f"event type {event_type!r} is not an event type name (like 'DeathRegistered')")
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r} is not one of given, refused, withdrawn")
    if recorded_by not in COLLECTION_METHODS:
        raise ValueError(f"recorded_by {recorded_by!r} is not one of informant, citizen, proxy")
    if recorded_at.tzinfo is None:
        raise ValueError("recorded_at must carry a time zone")
    base_url = settings.public_url.rstrip("/")
    events = EVENT_NAMES.get(event_type, f"{event_type} events")
    return {
        "iss": base_url,
        "sub": subject_id,
        "iat": int(issued_at.timestamp()),
        "jti": str(receipt_id),
        "version": KANTARA_VERSION,
        "jurisdiction": JURISDICTION,
        "consentTimestamp": int(recorded_at.timestamp()),
        "collectionMethod": COLLECTION_METHODS[recorded_by],
        "consentReceiptID": str(receipt_id),
        "language": LANGUAGE,
        "piiPrincipalId": subject_id,
        "piiControllers": [{**CONTROLLER, "piiControllerUrl": base_url}],
        "policyUrl": f"{base_url}/privacy",
        "services": [
            {
                "service": f"Telling {agency} about {events}",
                "purposes": [
                    {
                        "purpose": f"Telling {agency} about {events} that concern you, so you need not",
                        "purposeCategory": ["10 - 3rd Party Sharing for Core Function"],
                        "consentType": "EXPLICIT",
                        "piiCategory": PII_CATEGORIES.get(event_type, ["1 - Biographical"]),
                        "primaryPurpose": True,
                        "termination": "When you withdraw consent on the Tell Us Once consent page",
                        "thirdPartyDisclosure": True,
                        "thirdPartyName": agency,
                    }
                ],
            }
        ],
        "sensitive": False,
        "spiCat": [],
        "consentChange": {
            "choice": choice,
            "recordedBy": recorded_by,
            "recordedAt": _timestamp(recorded_at),
            "agency": agency,
            "eventType": event_type,
        },
    }


async def issue_consent_receipt(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    subject_id: str,
    agency: str,
    event_type: str,
    choice: str,
    recorded_by: str,
    recorded_at: datetime,
    receipt_id: uuid.UUID | None = None,
) -> str:
    """The signed receipt for one consent change, as a compact JWT."""
    claims = receipt_claims(
        settings,
        subject_id=subject_id,
        agency=agency,
        event_type=event_type,
        choice=choice,
        recorded_by=recorded_by,
        recorded_at=recorded_at,
        receipt_id=receipt_id or uuid.uuid4(),
        issued_at=datetime.now(UTC),
    )
    key_id, private = await _active_key(pool, PayloadSealer.from_settings(settings))
    header = {"alg": ALGORITHM, "kid": key_id, "typ": "JWT"}
    return jwt.encode(header, claims, OKPKey.import_key(private), algorithms=[ALGORITHM])


# --- verifying ---------------------------------------------------------------------------------


def _segment(text: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(text):
        raise InvalidConsentReceipt(f"the {what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidConsentReceipt(f"the {what} is not base64url") from None
    # One spelling per value: otherwise a changed last character can decode to the same bytes.
    if b64encode(raw) != text:
        raise InvalidConsentReceipt(f"the {what} is not canonical base64url (was it altered?)")
    return raw


def _key_for(key_id: str, jwks: Mapping[str, Any]) -> tuple[OKPKey, datetime | None]:
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise InvalidConsentReceipt(f"the key set is not a JWKS (fetch it from GET {KEYS_PATH})")
    for entry in keys:
        if not isinstance(entry, Mapping) or entry.get("kid") != key_id:
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            raise InvalidConsentReceipt(f"key {key_id!r} in the key set is not an Ed25519 key")
        try:
            public = b64decode(entry.get("x"), PUBLIC_KEY_BYTES, f"key {key_id!r}")
            retired = entry.get("retired_at")
            retired_at = None if retired is None else datetime.fromisoformat(str(retired))
        except ValueError as exc:
            raise InvalidConsentReceipt(f"key {key_id!r} in the key set is malformed: {exc}") from None
        if _key_id(public) != key_id:
            raise InvalidConsentReceipt(f"key {key_id!r} in the key set is not the key its id names")
        return OKPKey.import_key({"kty": "OKP", "crv": "Ed25519", "x": b64encode(public)}), retired_at
    raise UnknownReceiptKey(key_id)


def verify_consent_receipt(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """The receipt's claims, once its signature holds under a key of ``jwks``; else
    ``InvalidConsentReceipt`` (``UnknownReceiptKey`` when the key set lacks its key)."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise InvalidConsentReceipt("a receipt is a compact JWT: three base64url parts joined by dots")
    header_part, payload_part, signature_part = token.split(".")
    raw_header = _segment(header_part, "header")
    _segment(payload_part, "payload")
    _segment(signature_part, "signature")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, ValueError):
        raise InvalidConsentReceipt("the header is not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
        raise InvalidConsentReceipt(f"the header does not name the {ALGORITHM} algorithm")
    key_id = header.get("kid")
    if not isinstance(key_id, str):
        raise InvalidConsentReceipt("the header names no key (kid)")
    key, retired_at = _key_for(key_id, jwks)
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM]).claims
    except BadSignatureError:
        raise InvalidConsentReceipt(
            f"the signature does not hold under key {key_id!r}: it was altered"
        ) from None
    except JoseError as exc:
        raise InvalidConsentReceipt(f"the token cannot be read: {exc.description or exc.error}") from None
    missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise InvalidConsentReceipt(f"the claims lack {', '.join(missing)}")
    if claims["version"] != KANTARA_VERSION:
        raise InvalidConsentReceipt(f"version {claims['version']!r} is not {KANTARA_VERSION}")
    issued = claims.get("iat")
    if retired_at is not None and (not isinstance(issued, int) or issued > retired_at.timestamp()):
        raise InvalidConsentReceipt(f"issued after key {key_id!r} was retired")
    return dict(claims)


# --- publishing ----------------------------------------------------------------------------------


def consent_receipt_keys_router(pool: Callable[[], asyncpg.Pool]) -> APIRouter:
    """``GET /consent-receipts/keys``: the receipt keys as a JWKS; ``pool`` gives the database
    pool when a request comes."""
    router = APIRouter(tags=["consent receipts"])

    @router.get(KEYS_PATH, summary="Public keys that verify consent receipts (JWKS)")
    async def consent_receipt_keys() -> JSONResponse:
        return JSONResponse(
            await published_keys(pool()),
            headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"},
            media_type="application/jwk-set+json",
        )

    return router
