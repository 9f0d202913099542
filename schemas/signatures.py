"""Office signatures on life events, verifiable by an agency that receives only
some of an event's fields (selective disclosure, in the style of SD-JWT).

At intake the event is split into *items*, one per grantable field path (see
``schemas.fieldpaths``): the envelope without its personal fields (``envelope``),
each personal field of the envelope (``nino``, ``informant.name``,
``informant.relationship``, ``recorded_by``), each other top-level field by its
name, a related person's parts (``surviving_partner.person``, …; in a list, per
element: ``next_of_kin/0.person``), and — for fields the router filters element
by element (a correction's ``changes``) — each element as ``<field>/<index>``.
A related-person field that is null or an empty list is one item. Each item gets
a random 128-bit salt and a digest::

    digest = base64url(SHA-256(JSON([base64url(salt), name, canonical(value)])))

The office signs, with its Ed25519 key, a manifest naming the key and the event
and listing the sorted digests. Three Kafka headers carry it:

``tuo_sig``           base64url of the 64-byte Ed25519 signature over the manifest bytes
``tuo_sig_manifest``  the manifest, JSON: ``{"alg": "Ed25519", "digests": [...],
                      "event_id": ..., "event_type": ..., "hash": "sha-256", "kid": ..., "v": 2}``
``tuo_sig_salts``     JSON object, item name → base64url salt

The router passes the manifest and signature on untouched, with the salts of
only the items it delivers, so an agency can check each field it received
against the manifest and learns nothing about the others (a digest without its
salt reveals nothing). The signature format is part of the wire contract.

Verifying a message: the key named by ``kid`` comes from the key registry; the
signature must hold over the manifest bytes; the manifest's event id and type
must be the message's ``ce_id`` and ``ce_type``; every field present must have a
salt whose digest is in the manifest, except a null (or empty list) field
without one (withheld, or added to the schema after signing); the signed envelope's
``registration_office`` must be the key's office, ``ce_source`` must be
``/offices/<office>``, and the envelope's ``recorded_at`` must be before the
key's ``retired_at``. The router, which sees the whole event, also requires every
signed digest to be matched.

Canonical values (so that what fastavro decodes on the agency side, from a
``*Delivery`` schema, hashes exactly as what intake signed): JSON, UTF-8, keys
sorted, no whitespace, non-ASCII characters as themselves; records (and maps)
as objects *without their null members*; arrays in order; strings, booleans and
integers as themselves; ``date`` as ``YYYY-MM-DD``; ``timestamp-micros`` as UTC
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always six digits); ``uuid`` as lower-case
hyphenated text; enum symbols as strings. Floats, bytes and other types have no
canonical form yet and cannot be signed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol
from urllib.parse import quote
from uuid import UUID

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from schemas.codec import decode, encode
from schemas.fieldpaths import ENVELOPE_PATHS, split_fields
from schemas.fieldpaths import NINO as NINO  # the envelope NINO item, as subscriptions name it

# 2: items by field path. Version 1 (items by top-level field) cannot be minimised by
# path without breaking its signature, so it is refused rather than over-shared.
VERSION = 2
ALGORITHM = "Ed25519"
HASH = "sha-256"
SALT_BYTES = 16
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32

SIG_HEADER = "tuo_sig"
MANIFEST_HEADER = "tuo_sig_manifest"
SALTS_HEADER = "tuo_sig_salts"
SIGNATURE_HEADERS = (SIG_HEADER, MANIFEST_HEADER, SALTS_HEADER)

ENVELOPE = "envelope"
WITHHELD = "withheld_fields"  # the router's list in a *Delivery copy: not signed by the office
# Fields whose elements are items of their own, because the router delivers a subset of them.
ELEMENT_ITEMS: dict[str, frozenset[str]] = {"EventCorrected": frozenset({"changes"})}

MAX_HEADER_BYTES = 256 * 1024  # far above any real manifest; bounds the work a message can cause
MAX_ITEMS = 1000
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# Canonical base64url (no padding, unused bits zero) of a 16-byte salt and a 32-byte digest:
# checked as text, since salts and digests are only ever hashed and compared as text.
SALT_PATTERN = re.compile(r"[A-Za-z0-9_-]{21}[AQgw]")
DIGEST_PATTERN = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
_ELEMENT_INDEX = re.compile(r"/[0-9]+")

KafkaHeaders = list[tuple[str, bytes]]


class SignatureRejected(ValueError):
    """A message's office signature is missing, malformed or does not hold; the
    message goes to dead letters and is not handled."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"signature rejected: {reason}")
        self.reason = reason


class UnsignableValue(TypeError):
    """A value has no canonical form; extend ``canonical`` (and the manifest version) first."""


class Signer(Protocol):
    """An office's signing key (``producers.office_keys.SigningKey``)."""

    @property
    def key_id(self) -> str: ...

    @property
    def office(self) -> str: ...

    @property
    def private_key(self) -> Ed25519PrivateKey: ...


@dataclass(frozen=True)
class OfficeKey:
    """A published public key: which office it belongs to and when it was in use."""

    key_id: str
    office: str
    public_key: Ed25519PublicKey
    created_at: datetime
    retired_at: datetime | None = None

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            _verifier(self.raw()).verify(message, signature)
        except (BadSignatureError, ValueError):
            return False
        return True

    @classmethod
    def from_raw(
        cls, key_id: str, office: str, public_key: bytes, created_at: datetime, retired_at: datetime | None
    ) -> OfficeKey:
        return cls(key_id, office, Ed25519PublicKey.from_public_bytes(public_key), created_at, retired_at)

    def raw(self) -> bytes:
        return self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def to_json(self) -> dict[str, Any]:
        """The key as the key registry publishes it (``GET /v1/signing-keys``)."""
        return {
            "key_id": self.key_id,
            "office": self.office,
            "algorithm": ALGORITHM,
            "public_key": b64encode(self.raw()),
            "created_at": _timestamp(self.created_at),
            "retired_at": None if self.retired_at is None else _timestamp(self.retired_at),
        }

    @classmethod
    def from_json(cls, entry: Any) -> OfficeKey:
        """Raises ValueError naming what is wrong with a registry entry."""
        if not isinstance(entry, dict):
            raise ValueError("a key registry entry is not an object")
        if entry.get("algorithm") != ALGORITHM:
            raise ValueError(f"key {entry.get('key_id')!r} is not an {ALGORITHM} key")
        key_id, office = entry.get("key_id"), entry.get("office")
        if not isinstance(key_id, str) or not isinstance(office, str):
            raise ValueError("a key registry entry lacks key_id or office")
        retired = entry.get("retired_at")
        try:
            return cls.from_raw(
                key_id,
                office,
                b64decode(entry.get("public_key"), PUBLIC_KEY_BYTES, f"key {key_id}'s public_key"),
                _aware(datetime.fromisoformat(entry["created_at"])),
                None if retired is None else _aware(datetime.fromisoformat(retired)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"key {key_id}: {exc}") from None

    def signed_before_retirement(self, recorded_at: datetime) -> bool:
        return self.retired_at is None or recorded_at < self.retired_at


@functools.lru_cache(maxsize=1024)
def _verifier(raw: bytes) -> VerifyKey:
    """A key parsed once for libsodium (PyNaCl), which verifies in 41 µs where OpenSSL
    takes 83 µs on this machine (``python -m bench.ed25519``)."""
    return VerifyKey(raw)


# --- canonical form and digests ---------------------------------------------------------------


def canonical(value: Any) -> Any:
    """The JSON-ready canonical form of a value as fastavro reads or writes it."""
    kind = type(value)
    if kind is str or value is None:  # the common cases first: this runs for every field
        return value
    if kind is dict:
        return _canonical_members(value)
    if kind is list:
        return [canonical(element) for element in value]
    if isinstance(value, str | bool | int):
        return value
    if isinstance(value, datetime):  # before date: a datetime is a date
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # fastavro: naive is UTC
        return aware.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Mapping):
        return _canonical_members(value)
    if isinstance(value, list | tuple):
        return [canonical(element) for element in value]
    raise UnsignableValue(f"{type(value).__name__} values have no canonical form for signing")


def _canonical_members(record: Mapping[Any, Any]) -> dict[str, Any]:
    members = {}
    for key, member in record.items():
        if type(key) is not str:
            raise UnsignableValue(f"a record key is {type(key).__name__}, not a string")
        if member is not None:
            members[key] = canonical(member)
    return members


_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace, UTF-8 (for these values, RFC 8785's form)."""
    return _JSON.encode(value).encode()


def digest(salt: str, name: str, value: Any) -> str:
    """``salt`` as it travels: base64url of 16 random bytes."""
    disclosure = canonical_json([salt, name, canonical(value)])
    return b64encode(hashlib.sha256(disclosure).digest())


def element_item(field: str, index: int) -> str:
    return f"{field}/{index}"


def part_item(field: str, part: str, index: int | None = None) -> str:
    """A related person's part: ``surviving_partner.nino``, or ``next_of_kin/0.nino`` in a list."""
    return f"{field}.{part}" if index is None else f"{element_item(field, index)}.{part}"


def item_path(name: str) -> str:
    """The field path an item belongs to: ``next_of_kin/0.person`` → ``next_of_kin.person``."""
    return _ELEMENT_INDEX.sub("", name)


def envelope_core(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope without its personal fields: what every agency receives."""
    core = dict(envelope)
    for outer, inner in ENVELOPE_PATHS.values():
        member = core.get(outer)
        if isinstance(member, Mapping):
            core[outer] = {**member, inner: None}
    return core


def envelope_value(envelope: Mapping[str, Any], path: str) -> Any:
    outer, inner = ENVELOPE_PATHS[path]
    member = envelope.get(outer)
    return member.get(inner) if isinstance(member, Mapping) else None


def _split(event_type: str) -> Mapping[str, tuple[str, ...]]:
    try:
        return split_fields(event_type)
    except LookupError:  # not an event type of ours: nothing is split, and verification fails later
        return {}


def items(event_type: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Every item the office signs for a whole event: item name → value."""
    envelope = record[ENVELOPE]
    found: dict[str, Any] = {ENVELOPE: envelope_core(envelope)}
    for path in ENVELOPE_PATHS:
        found[path] = envelope_value(envelope, path)
    per_element = ELEMENT_ITEMS.get(event_type, frozenset())
    split = _split(event_type)
    for name, value in record.items():
        if name in (ENVELOPE, WITHHELD):
            continue
        if name in per_element:
            for index, element in enumerate(value):
                found[element_item(name, index)] = element
        elif name in split and isinstance(value, Mapping):
            for part in split[name]:
                found[part_item(name, part)] = value.get(part)
        elif name in split and isinstance(value, list) and value:
            for index, element in enumerate(value):
                for part in split[name]:
                    found[part_item(name, part, index)] = element.get(part)
        else:
            found[name] = value
    return found


# --- the signed headers -----------------------------------------------------------------------


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64encode(raw: bytes) -> str:
    """base64url without padding (``base64.urlsafe_b64encode``'s, with less done per call)."""
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").translate(_URLSAFE).decode("ascii")


def b64decode(text: Any, length: int, what: str) -> bytes:
    if not isinstance(text, str) or not _BASE64URL.fullmatch(text):
        raise ValueError(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url") from None
    if len(raw) != length:
        raise ValueError(f"{what} is {len(raw)} bytes, expected {length}")
    if b64encode(raw) != text:  # one spelling per value: no padding, unused bits zero
        raise ValueError(f"{what} is not canonical base64url")
    return raw


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment.isoformat()} has no time zone")
    return moment


def _timestamp(moment: datetime) -> str:
    return str(canonical(moment))


@dataclass(frozen=True)
class Manifest:
    """What the office signs: which key, which event, and the digest of every item."""

    key_id: str
    event_id: str
    event_type: str
    digests: frozenset[str]

    def to_json(self) -> bytes:
        return canonical_json(
            {
                "v": VERSION,
                "alg": ALGORITHM,
                "hash": HASH,
                "kid": self.key_id,
                "event_id": self.event_id,
                "event_type": self.event_type,
                "digests": sorted(self.digests),
            }
        )

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            found = _strict_json(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SignatureRejected(f"the manifest is not JSON ({exc})") from None
        if not isinstance(found, dict):
            raise SignatureRejected("the manifest is not a JSON object")
        if found.get("v") != VERSION:
            raise SignatureRejected(f"manifest version {found.get('v')!r} is not {VERSION}")
        if found.get("alg") != ALGORITHM or found.get("hash") != HASH:
            raise SignatureRejected(f"the manifest is not {ALGORITHM} over {HASH}")
        texts = {name: found.get(name) for name in ("kid", "event_id", "event_type")}
        for name, text in texts.items():
            if not isinstance(text, str) or not 1 <= len(text) <= 200:
                raise SignatureRejected(f"the manifest's {name} is not a string of 1-200 characters")
        digests = found.get("digests")
        if not isinstance(digests, list) or not 1 <= len(digests) <= MAX_ITEMS:
            raise SignatureRejected(f"the manifest's digests are not a list of 1-{MAX_ITEMS}")
        for entry in digests:
            if not isinstance(entry, str) or not DIGEST_PATTERN.fullmatch(entry):
                raise SignatureRejected(f"the manifest's digest {entry!r} is not a base64url SHA-256")
        if digests != sorted(set(digests)):
            raise SignatureRejected("the manifest's digests are not sorted and distinct")
        return cls(str(texts["kid"]), str(texts["event_id"]), str(texts["event_type"]), frozenset(digests))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key appears twice")
    return found


_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)  # made once: json.loads makes one a call


def _strict_json(raw: bytes) -> Any:
    """UTF-8 JSON in which no object names a key twice."""
    return _STRICT.decode(raw.decode("utf-8"))


@dataclass(frozen=True)
class SignedEvent:
    """The signature headers of one message, parsed but not yet verified."""

    manifest: Manifest
    manifest_bytes: bytes  # exactly as signed
    signature: bytes
    salts: Mapping[str, str]  # item name → base64url salt

    @functools.cached_property
    def _signature_header(self) -> bytes:  # one event's copies all carry it
        return b64encode(self.signature).encode()

    def headers(self, disclose: Iterable[str] | None = None) -> KafkaHeaders:
        """The three headers, with the salts of ``disclose`` only (default: all)."""
        return disclosing(self._signature_header, self.manifest_bytes, self.salts, disclose)


def disclosing(
    signature: bytes, manifest: bytes, salts: Mapping[str, str], disclose: Iterable[str] | None = None
) -> KafkaHeaders:
    """An event's signature headers (``signature`` as its header carries it, base64url),
    with the salts of ``disclose`` only (default: all)."""
    names = sorted(salts) if disclose is None else sorted(set(disclose) & set(salts))
    return disclosing_these(signature, manifest, names, [salts[name] for name in names])


def disclosing_these(
    signature: bytes, manifest: bytes, names: Sequence[str], salts: Sequence[str]
) -> KafkaHeaders:
    """``disclosing``, given the disclosed items' ``names`` already sorted and their
    ``salts`` in the same order."""
    return three_headers(signature, manifest, _salts_json(names, salts))


def three_headers(signature: bytes, manifest: bytes, salts_json: bytes) -> KafkaHeaders:
    """The three headers, given the salts header's ``canonical_json`` already made."""
    return [(SIG_HEADER, signature), (MANIFEST_HEADER, manifest), (SALTS_HEADER, salts_json)]


def salts_template(names: Sequence[str]) -> str | None:
    """A ``%``-template of the salts header for ``names`` (sorted), to be filled with their
    salts, each one ``plain``: for a caller that works the names out once per grant and
    fills it for every event. ``None`` when a name needs escaping in JSON."""
    if not plain("".join(names)):
        return None
    return "{" + ",".join(f'"{name}":"%s"' for name in names) + "}"


def plain(text: str) -> bool:
    """Whether ``text`` needs no escaping in JSON (nor in a ``%``-template): what item
    names and base64url salts are made of."""
    return _PLAIN.fullmatch(text) is not None


# Characters that need no escaping in JSON: item names and base64url salts are made of them.
_PLAIN = re.compile(r"[A-Za-z0-9_./\-]*")


def _salts_json(names: Sequence[str], values: Sequence[str]) -> bytes:
    """``canonical_json`` of ``{name: value}`` for ``names`` (sorted) and their salts'
    ``values``, written directly when no name or salt needs escaping: a copy's salts
    header is made for every agency of every event."""
    if not plain("".join(names) + "".join(values)):
        return canonical_json(dict(zip(names, values, strict=True)))
    return ("{" + ",".join(f'"{n}":"{v}"' for n, v in zip(names, values, strict=True)) + "}").encode()


def sign(key: Signer, event_type: str, record: Mapping[str, Any]) -> SignedEvent:
    """Sign a whole event, given as fastavro decodes it (see ``signature_headers``)."""
    envelope = record[ENVELOPE]
    if envelope["registration_office"] != key.office:
        office = envelope["registration_office"]
        raise ValueError(f"key {key.key_id} belongs to {key.office}, but the event is for {office}")
    return sign_items(
        key.key_id, key.private_key, str(envelope["event_id"]), event_type, items(event_type, record)
    )


def sign_items(
    key_id: str, private_key: Ed25519PrivateKey, event_id: str, event_type: str, values: Mapping[str, Any]
) -> SignedEvent:
    """A fresh salt and digest for every item, and the manifest of them signed."""
    salts = {name: b64encode(secrets.token_bytes(SALT_BYTES)) for name in values}
    manifest = Manifest(
        key_id=key_id,
        event_id=event_id,
        event_type=event_type,
        digests=frozenset(digest(salts[name], name, value) for name, value in values.items()),
    )
    manifest_bytes = manifest.to_json()
    return SignedEvent(manifest, manifest_bytes, private_key.sign(manifest_bytes), salts)


def signature_headers(key: Signer, event_type: str, record: dict[str, Any], event_id: str) -> KafkaHeaders:
    """The signature headers for an event about to be published. ``record`` is the
    Avro-ready dict that is encoded; it is signed as fastavro reads it back, so a
    UUID given as text or a datetime in another zone signs as the agency will see it."""
    return value_signature_headers(key, event_type, encode(event_type, record), event_id)


def value_signature_headers(key: Signer, event_type: str, value: bytes, event_id: str) -> KafkaHeaders:
    """``signature_headers`` for an event already encoded (``value``, as it is published):
    read back once, not encoded again."""
    _, decoded = decode(value)
    if str(decoded[ENVELOPE]["event_id"]) != event_id:
        raise ValueError(f"event id {event_id} is not the envelope's {decoded[ENVELOPE]['event_id']}")
    return sign(key, event_type, decoded).headers()


def read_signature(headers: Sequence[tuple[str, bytes]]) -> SignedEvent:
    """Parse a message's signature headers (nothing is trusted yet)."""
    found: dict[str, bytes] = {}
    for name, value in headers:
        if name in SIGNATURE_HEADERS:
            if name in found:
                raise SignatureRejected(f"the {name} header appears twice")
            if len(value) > MAX_HEADER_BYTES:
                raise SignatureRejected(f"the {name} header is over {MAX_HEADER_BYTES} bytes")
            found[name] = bytes(value)
    if not found:
        raise SignatureRejected("the event is unsigned (no tuo_sig headers)")
    missing = [name for name in SIGNATURE_HEADERS if name not in found]
    if missing:
        raise SignatureRejected(f"the {', '.join(missing)} header is missing")
    manifest = Manifest.parse(found[MANIFEST_HEADER])
    try:
        signature = b64decode(found[SIG_HEADER].decode("ascii"), SIGNATURE_BYTES, "the signature")
        salts_json = _strict_json(found[SALTS_HEADER])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureRejected(str(exc)) from None
    if not isinstance(salts_json, dict) or len(salts_json) > MAX_ITEMS:
        raise SignatureRejected(f"the salts are not a JSON object of at most {MAX_ITEMS} items")
    for name, salt in salts_json.items():
        if not isinstance(salt, str) or not SALT_PATTERN.fullmatch(salt):
            raise SignatureRejected(f"the salt of {name} is not base64url of {SALT_BYTES} bytes")
    return SignedEvent(manifest, found[MANIFEST_HEADER], signature, salts_json)


def key_id_of(headers: Sequence[tuple[str, bytes]]) -> str | None:
    """The key a message claims to be signed with, if its headers parse (to fetch keys ahead)."""
    try:
        return read_signature(headers).manifest.key_id
    except SignatureRejected:
        return None


def office_source(office: str) -> str:
    """The CloudEvents source of an office's events."""
    return "/offices/" + quote(office, safe="")


# --- verification -----------------------------------------------------------------------------


def verify(
    signed: SignedEvent,
    key: OfficeKey | None,
    *,
    event_type: str,
    event_id: str,
    source: str,
    body: Mapping[str, Any],
    complete: bool = False,
) -> None:
    """Check that ``body`` (a whole event, or the copy one agency received) came from
    the office that holds ``key``. Every field present must be covered by a disclosed
    salt whose digest the office signed, except fields that are null (withheld).
    With ``complete``, every signed item must be present too (the router's check on
    the whole event). Raises SignatureRejected with the reason."""
    manifest = signed.manifest
    if key is None or key.key_id != manifest.key_id:
        raise SignatureRejected(f"signing key {manifest.key_id!r} is not in the key registry")
    if not key.verifies(signed.signature, signed.manifest_bytes):
        raise SignatureRejected(f"the signature does not verify with key {key.key_id}")
    if manifest.event_type != event_type:
        raise SignatureRejected(f"the office signed a {manifest.event_type}, not a {event_type}")
    if manifest.event_id != event_id:
        raise SignatureRejected(f"the office signed event {manifest.event_id}, not {event_id}")
    envelope = body.get(ENVELOPE)
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("subject"), Mapping):
        raise SignatureRejected("the event has no envelope")
    _check_items(signed, event_type, body, complete)
    # The envelope is now known to be the office's own.
    if str(envelope.get("event_id")) != event_id:
        raise SignatureRejected("the signed envelope is for another event")
    office = envelope.get("registration_office")
    if office != key.office:
        raise SignatureRejected(f"key {key.key_id} belongs to {key.office}, not to {office}")
    if source != office_source(key.office):
        raise SignatureRejected(f"ce_source is {source}, not {office_source(key.office)}")
    recorded_at = envelope.get("recorded_at")
    if not isinstance(recorded_at, datetime):
        raise SignatureRejected("the envelope has no recorded_at time")
    if not key.signed_before_retirement(recorded_at):
        raise SignatureRejected(
            f"key {key.key_id} was retired at {key.retired_at}, before the event was recorded"
        )


def _check_items(signed: SignedEvent, event_type: str, body: Mapping[str, Any], complete: bool) -> None:
    salts, signed_digests = signed.salts, signed.manifest.digests
    matched: set[str] = set()

    def check(name: str, value: Any) -> None:
        salt = salts.get(name)
        if salt is None:
            raise SignatureRejected(f"{name} is not covered by the signature (no salt)")
        try:
            found = digest(salt, name, value)
        except UnsignableValue as exc:
            raise SignatureRejected(f"{name}: {exc}") from None
        if found not in signed_digests:
            raise SignatureRejected(f"{name} is not what the office signed (digest mismatch)")
        matched.add(found)

    envelope = body[ENVELOPE]
    check(ENVELOPE, envelope_core(envelope))
    for path in ENVELOPE_PATHS:
        value = envelope_value(envelope, path)
        if path in salts:
            check(path, value)
        elif value is not None:
            raise SignatureRejected(f"the envelope's {path} is not covered by the signature (no salt)")
    per_element = ELEMENT_ITEMS.get(event_type, frozenset())
    split = _split(event_type)
    for name, value in body.items():
        if name in (ENVELOPE, WITHHELD):
            continue
        if name in per_element:
            if not isinstance(value, list):
                raise SignatureRejected(f"{name} is not a list")
            indices = sorted(_element_indices(salts, name))
            if len(indices) != len(value):
                raise SignatureRejected(
                    f"{name} has {len(value)} elements but salts for {len(indices)} were disclosed"
                )
            for index, element in zip(indices, value, strict=True):
                check(element_item(name, index), element)
        elif name in salts:
            check(name, value)
        elif name in split and isinstance(value, Mapping):
            _check_parts(check, salts, name, split[name], value, None)
        elif name in split and isinstance(value, list) and value:
            # Each part's item name carries its element's index, so elements cannot be
            # moved or swapped; one with nothing granted is all nulls and needs no salt.
            for index, element in enumerate(value):
                if not isinstance(element, Mapping):
                    raise SignatureRejected(f"{name}/{index} is not a record")
                _check_parts(check, salts, name, split[name], element, index)
        elif not (value is None or value == []):  # withheld, or a field added since it was signed
            raise SignatureRejected(f"{name} is not covered by the signature (no salt)")
    if complete and matched != signed_digests:
        missing = len(signed_digests - matched)
        raise SignatureRejected(f"{missing} signed item(s) are missing from the event")


def _check_parts(
    check: Callable[[str, Any], None],
    salts: Mapping[str, str],
    field: str,
    parts: tuple[str, ...],
    value: Mapping[str, Any],
    index: int | None,
) -> None:
    unknown = set(value) - set(parts)
    if unknown:
        raise SignatureRejected(f"{field} has members no office signs: {', '.join(sorted(unknown))}")
    for part in parts:
        name = part_item(field, part, index)
        if name in salts:
            check(name, value.get(part))
        elif value.get(part) is not None:
            raise SignatureRejected(f"{name} is not covered by the signature (no salt)")


def _element_indices(salts: Mapping[str, str], field: str) -> Iterable[int]:
    prefix = f"{field}/"
    for name in salts:
        if name.startswith(prefix):
            index = name[len(prefix) :]
            if not _INDEX.fullmatch(index):
                raise SignatureRejected(f"{name} is not a salt name")
            yield int(index)
