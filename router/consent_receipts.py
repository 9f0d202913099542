"""Consent receipts: every consent change (given, refused, withdrawn) is answered
with a receipt in the shape of the Kantara Initiative Consent Receipt
Specification v1.1, signed as a JWT that anyone can check against the published
keys.

A receipt is a compact JWS (RFC 7515) whose header is ``{"alg": "EdDSA",
"kid": <RFC 7638 thumbprint>, "typ": "JWT"}`` (RFC 8037: the name every JOSE
library verifies, PyJWT and npm's ``jose`` among them; receipts issued before
under RFC 9864's ``Ed25519`` still verify here) and whose claims are the Kantara fields —
``piiPrincipalId`` is the pseudonymous subject id, never a NINO or a name; the
controller is Tell Us Once; the one service/purpose is telling one agency about
one type of event, ``consentType`` ``EXPLICIT`` — plus the JWT claims ``iss``,
``sub``, ``iat`` and ``jti`` (the receipt id), and ``consentChange``, which says
what Kantara has no field for: the choice, who recorded it, exactly when, and the
agency and event type in machine form. ``policyUrl`` is the privacy notice the
service serves (``citizens.privacy``).

Every receipt is stored when it is issued (``consent_receipt``), whoever recorded
the choice: the citizen or a proxy online (``issue_consent_receipt``), or the
informant at the desk, in the same transaction as the event
(``ConsentReceiptIssuer``, called by ``producers.store.record_event``). The citizen
lists and downloads them on their pages.

The signing key lives in PostgreSQL (``consent_receipt_key``), made on first use;
its private half is sealed with the data key (``runtime.sealing``), bound to the
key id. Rotation retires the active key and makes a new one; retired public keys
stay in the JWKS served at ``GET /.well-known/consent-receipts/jwks.json`` (and at
its earlier address ``GET /consent-receipts/keys``), so old receipts still verify,
and a receipt dated after its key's retirement does not. The set is apart from the
office signing keys at ``/.well-known/jwks.json``: a registration office's key
must never verify as a consent receipt in a library that picks keys by ``kid``.

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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError, SecurityWarning
from joserfc.jwk import OKPKey

from runtime.keyring import CACHE_SECONDS
from runtime.sealing import CannotOpen, PayloadSealer
from runtime.settings import Settings
from schemas.signatures import PUBLIC_KEY_BYTES, b64decode, b64encode

ALGORITHM = "EdDSA"
# Receipts issued before the switch to EdDSA named the same signature by RFC 9864's name.
ALGORITHMS = (ALGORITHM, "Ed25519")
KANTARA_VERSION = "KI-CR-v1.1.0"
JURISDICTION = "GB"
LANGUAGE = "en"
JWKS_PATH = "/.well-known/consent-receipts/jwks.json"
KEYS_PATH = "/consent-receipts/keys"  # the earlier address of the same key set, still served
POLICY_PATH = "/privacy"  # the privacy notice (citizens.privacy)

ConsentChoice = Literal["given", "refused", "withdrawn"]
RecordedBy = Literal["informant", "citizen", "proxy"]

CHOICES: frozenset[str] = frozenset({"given", "refused", "withdrawn"})
COLLECTION_METHODS: dict[str, str] = {
    "citizen": "Online, by the citizen on the Tell Us Once consent page",
    "proxy": "Online, by a proxy the citizen appointed",
    "informant": "In person, by the informant at the register office desk",
}
# The informant's choices come through the registration, by its channel.
INFORMANT_CHANNELS: dict[str, str] = {
    "desk": COLLECTION_METHODS["informant"],
    "phone": "By telephone, by the informant (to a registrar, or to a contact-centre agent)",
    "online": "Online, by the informant in the registration service",
    "system": "By the informant, sent by the register office's system",
}
# Kantara's PII categories (Appendix of v1.1) for what each event type carries.
PII_CATEGORIES: dict[str, list[str]] = {
    "BirthRegistered": ["1 - Biographical", "2 - Contact"],
    "DeathRegistered": ["1 - Biographical", "2 - Contact", "8 - Official ID"],
    "AddressChanged": ["1 - Biographical", "2 - Contact", "8 - Official ID"],
    "ServicesRequested": ["1 - Biographical", "2 - Contact", "8 - Official ID"],
}
EVENT_NAMES: dict[str, str] = {
    "BirthRegistered": "birth registrations",
    "DeathRegistered": "death registrations",
    "AddressChanged": "changes of address",
    "ServicesRequested": "the informant's requests to tell more organisations",
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


@dataclass(frozen=True)
class DeskConsent:
    """A consent choice the informant made at the desk, as just stored with its event."""

    consent_record_id: int
    subject_id: str
    agency: str
    event_type: str
    choice: str
    recorded_at: datetime
    event_id: UUID
    channel: str  # desk, phone, online or system: how the informant gave it


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
            f"(fetch the current keys from GET {JWKS_PATH})"
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


async def _active_key(conn: asyncpg.Connection, sealer: PayloadSealer) -> tuple[str, Ed25519PrivateKey]:
    query = "SELECT key_id, sealed_private_key FROM consent_receipt_key WHERE retired_at IS NULL"
    row = await conn.fetchrow(query)
    if row is None:
        # A savepoint when the caller's transaction is open: the lock is held until it ends.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
            if await conn.fetchval("SELECT count(*) FROM consent_receipt_key WHERE retired_at IS NULL") == 0:
                await _insert_key(conn, sealer)
        row = await conn.fetchrow(query)
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
    async with pool.acquire() as conn:
        return await consent_signer_within(conn, settings)


async def consent_signer_within(conn: asyncpg.Connection, settings: Settings) -> ConsentSigningKey:
    """``consent_signer`` read on ``conn``, inside its caller's transaction (intake's,
    when an informant's refusal ends a consent): no second connection is taken."""
    key_id, private = await _active_key(conn, PayloadSealer.from_settings(settings))
    return ConsentSigningKey(key_id, private)


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
    channel: str | None = None,
) -> dict[str, Any]:
    """The receipt's claims: the Kantara v1.1 fields for one consent change, and ``consentChange``;
    ``channel`` says how an informant's choice came (desk, phone, online, system)."""
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
    if channel is not None and (recorded_by != "informant" or channel not in INFORMANT_CHANNELS):
        raise ValueError(f"channel {channel!r} is not one of desk, phone, online, system for an informant")
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
        "collectionMethod": INFORMANT_CHANNELS[channel] if channel else COLLECTION_METHODS[recorded_by],
        "consentReceiptID": str(receipt_id),
        "language": LANGUAGE,
        "piiPrincipalId": subject_id,
        "piiControllers": [{**CONTROLLER, "piiControllerUrl": base_url}],
        "policyUrl": f"{base_url}{POLICY_PATH}",
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


@contextmanager
def _eddsa() -> Iterator[None]:
    """RFC 9864 deprecates the name "EdDSA" in favour of "Ed25519", and joserfc warns on
    each use; we keep "EdDSA" on purpose, as the name every JOSE library verifies today."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
        yield


@dataclass(frozen=True)
class StoredReceipt:
    """A consent receipt as issued and stored: its token, and its claims in brief for listing."""

    receipt_id: uuid.UUID
    subject_id: str
    agency: str
    event_type: str
    choice: str
    recorded_by: str
    recorded_at: datetime
    issued_at: datetime
    token: str

    @property
    def filename(self) -> str:
        return f"consent-receipt-{self.receipt_id}.jwt"


@dataclass(frozen=True)
class _Change:
    """One consent change to sign: the claims' inputs, and where the desk's came from."""

    subject_id: str
    agency: str
    event_type: str
    choice: str
    recorded_by: str
    recorded_at: datetime
    receipt_id: uuid.UUID
    channel: str | None = None
    consent_record_id: int | None = None
    event_id: uuid.UUID | None = None


async def _issue(
    conn: asyncpg.Connection, settings: Settings, sealer: PayloadSealer, changes: Sequence[_Change]
) -> list[StoredReceipt]:
    """Sign each consent change and store the receipts, on ``conn`` (in the caller's
    transaction): the key is opened once, and the rows go in one statement."""
    issued_at = datetime.now(UTC)
    claims = [
        receipt_claims(
            settings,
            subject_id=change.subject_id,
            agency=change.agency,
            event_type=change.event_type,
            choice=change.choice,
            recorded_by=change.recorded_by,
            recorded_at=change.recorded_at,
            receipt_id=change.receipt_id,
            issued_at=issued_at,
            channel=change.channel,
        )
        for change in changes  # checked before anything is signed
    ]
    key_id, private = await _active_key(conn, sealer)
    header = {"alg": ALGORITHM, "kid": key_id, "typ": "JWT"}
    signing_key = OKPKey.import_key(private)
    with _eddsa():
        tokens = [jwt.encode(header, each, signing_key, algorithms=[ALGORITHM]) for each in claims]
    await conn.executemany(
        "INSERT INTO consent_receipt (receipt_id, subject_id, agency, event_type, choice, recorded_by,"
        " recorded_at, consent_record_id, event_id, key_id, issued_at, token)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        [
            (
                c.receipt_id,
                c.subject_id,
                c.agency,
                c.event_type,
                c.choice,
                c.recorded_by,
                c.recorded_at,
                c.consent_record_id,
                c.event_id,
                key_id,
                issued_at,
                token,
            )
            for c, token in zip(changes, tokens, strict=True)
        ],
    )
    return [
        StoredReceipt(
            c.receipt_id,
            c.subject_id,
            c.agency,
            c.event_type,
            c.choice,
            c.recorded_by,
            c.recorded_at,
            issued_at,
            token,
        )
        for c, token in zip(changes, tokens, strict=True)
    ]


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
    """The signed receipt for one consent change, as a compact JWT, stored for the citizen."""
    change = _Change(
        subject_id, agency, event_type, choice, recorded_by, recorded_at, receipt_id or uuid.uuid4()
    )
    async with pool.acquire() as conn, conn.transaction():
        [stored] = await _issue(conn, settings, PayloadSealer.from_settings(settings), [change])
    return stored.token


class ConsentReceiptIssuer:
    """Signs the receipts for the informant's choices at the desk, in the event's own
    transaction (``producers.store.ConsentReceipts``): no choice is stored without one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sealer = PayloadSealer.from_settings(settings)

    async def issue_for_desk(self, conn: asyncpg.Connection, consents: Sequence[DeskConsent]) -> None:
        changes = [
            _Change(
                subject_id=consent.subject_id,
                agency=consent.agency,
                event_type=consent.event_type,
                choice=consent.choice,
                recorded_by="informant",
                recorded_at=consent.recorded_at,
                receipt_id=uuid.uuid4(),
                channel=consent.channel,
                consent_record_id=consent.consent_record_id,
                event_id=consent.event_id,
            )
            for consent in consents
        ]
        await _issue(conn, self.settings, self.sealer, changes)


_STORED = (
    "SELECT receipt_id, subject_id, agency, event_type, choice, recorded_by, recorded_at, issued_at, token"
    "  FROM consent_receipt"
)


def _stored(row: asyncpg.Record) -> StoredReceipt:
    return StoredReceipt(
        row["receipt_id"],
        row["subject_id"],
        row["agency"],
        row["event_type"],
        row["choice"],
        row["recorded_by"],
        row["recorded_at"],
        row["issued_at"],
        row["token"],
    )


async def receipts_of(
    pool: asyncpg.Pool, subject_id: str, agencies: frozenset[str] | None
) -> list[StoredReceipt]:
    """The subject's receipts (about ``agencies`` only, for a proxy; ``None``: all), newest first."""
    rows = await pool.fetch(
        _STORED + " WHERE subject_id = $1 AND ($2::text[] IS NULL OR agency = ANY($2::text[]))"
        " ORDER BY issued_at DESC, receipt_id",
        subject_id,
        None if agencies is None else sorted(agencies),
    )
    return [_stored(row) for row in rows]


async def receipt_of(
    pool: asyncpg.Pool, subject_id: str, receipt_id: uuid.UUID, agencies: frozenset[str] | None
) -> StoredReceipt | None:
    """One of the subject's receipts; ``None`` when it is someone else's, or outside ``agencies``."""
    row = await pool.fetchrow(
        _STORED + " WHERE receipt_id = $1 AND subject_id = $2"
        " AND ($3::text[] IS NULL OR agency = ANY($3::text[]))",
        receipt_id,
        subject_id,
        None if agencies is None else sorted(agencies),
    )
    return None if row is None else _stored(row)


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
        raise InvalidConsentReceipt(f"the key set is not a JWKS (fetch it from GET {JWKS_PATH})")
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
    if not isinstance(header, dict) or header.get("alg") not in ALGORITHMS:
        raise InvalidConsentReceipt(f"the header does not name the {ALGORITHM} algorithm")
    key_id = header.get("kid")
    if not isinstance(key_id, str):
        raise InvalidConsentReceipt("the header names no key (kid)")
    key, retired_at = _key_for(key_id, jwks)
    try:
        with _eddsa():
            claims = jwt.decode(token, key, algorithms=[header["alg"]]).claims
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
    """``GET /.well-known/consent-receipts/jwks.json`` (and its earlier address
    ``GET /consent-receipts/keys``): the receipt keys as a JWKS; ``pool`` gives the
    database pool when a request comes."""
    router = APIRouter(tags=["consent receipts"])

    async def key_set() -> JSONResponse:
        return JSONResponse(
            await published_keys(pool()),
            headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"},
            media_type="application/jwk-set+json",
        )

    router.add_api_route(
        JWKS_PATH, key_set, methods=["GET"], summary="Public keys that verify consent receipts (JWKS)"
    )
    router.add_api_route(
        KEYS_PATH, key_set, methods=["GET"], summary="The same key set at its earlier address"
    )
    return router
