"""Signatures on ConsentChanged messages (unit tests, no broker): the consent
service's key signs them, and an agency accepts only exactly what it signed."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas import decode, encode
from schemas.consent_signatures import (
    CONSENT_SERVICE,
    CONSENT_SOURCE,
    sign_consent_change,
    verify_consent_change,
)
from schemas.signatures import OfficeKey, SignatureRejected, SignedEvent, read_signature


@dataclass(frozen=True)
class Key:
    key_id: str
    private_key: Ed25519PrivateKey

    def public(self, owner: str = CONSENT_SERVICE, retired_at: datetime | None = None) -> OfficeKey:
        return OfficeKey(
            self.key_id, owner, self.private_key.public_key(), datetime(2026, 1, 1, tzinfo=UTC), retired_at
        )


def new_key(key_id: str = "consent-key-1") -> Key:
    return Key(key_id, Ed25519PrivateKey.generate())


def change(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "change_id": str(uuid.uuid4()),
        "subject_id": "n-" + "0" * 32,
        "agency": "dvla",
        "event_type": "DeathRegistered",
        "choice": "WITHDRAWN",
        "recorded_by": "CITIZEN",
        "recorded_at": datetime(2026, 11, 21, 9, 30, tzinfo=UTC),
    }
    record.update(overrides)
    return record


def as_received(record: dict[str, Any]) -> dict[str, Any]:
    """The record as the agency decodes it."""
    _, body = decode(encode("ConsentChanged", record))
    return body


def check(signed: SignedEvent, key: OfficeKey | None, body: dict[str, Any], **overrides: Any) -> None:
    arguments: dict[str, Any] = {"event_id": str(body["change_id"]), "source": CONSENT_SOURCE, "body": body}
    arguments.update(overrides)
    verify_consent_change(read_signature(signed.headers()), key, **arguments)


def test_what_the_consent_service_signed_verifies_with_its_published_key() -> None:
    key, record = new_key(), change()
    signed = sign_consent_change(key, record)
    check(signed, key.public(), as_received(record))
    assert signed.manifest.event_type == "ConsentChanged"
    assert signed.manifest.event_id == record["change_id"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("choice", "GIVEN"),
        ("agency", "hmrc"),
        ("subject_id", "n-" + "1" * 32),
        ("event_type", "AddressChanged"),
        ("recorded_at", datetime(2026, 11, 22, tzinfo=UTC)),
    ],
)
def test_a_change_altered_after_signing_is_refused(field: str, value: Any) -> None:
    key, record = new_key(), change()
    signed = sign_consent_change(key, record)
    with pytest.raises(SignatureRejected, match="digest mismatch"):
        check(signed, key.public(), as_received({**record, field: value}))


def test_a_key_the_consent_key_set_does_not_hold_is_refused() -> None:
    record = change()
    forged = sign_consent_change(new_key("consent-key-1"), record)  # same id, another private key
    with pytest.raises(SignatureRejected, match="does not verify"):
        check(forged, new_key("consent-key-1").public(), as_received(record))
    with pytest.raises(SignatureRejected, match="not a consent service key"):
        check(sign_consent_change(new_key("stranger"), record), None, as_received(record))


def test_an_office_key_cannot_sign_a_consent_change() -> None:
    key, record = new_key(), change()
    with pytest.raises(SignatureRejected, match="not to the consent service"):
        check(sign_consent_change(key, record), key.public(owner="leeds"), as_received(record))


def test_the_message_must_say_it_is_this_change_from_the_consent_service() -> None:
    key, record = new_key(), change()
    signed, body = sign_consent_change(key, record), as_received(record)
    with pytest.raises(SignatureRejected, match="signed change"):
        check(signed, key.public(), body, event_id=str(uuid.uuid4()))
    with pytest.raises(SignatureRejected, match="ce_source"):
        check(signed, key.public(), body, source="/offices/leeds")


def test_a_change_recorded_after_its_key_was_retired_is_refused() -> None:
    key, record = new_key(), change()
    retired = key.public(retired_at=record["recorded_at"] - timedelta(seconds=1))
    with pytest.raises(SignatureRejected, match="retired"):
        check(sign_consent_change(key, record), retired, as_received(record))
    check(
        sign_consent_change(key, record),
        key.public(retired_at=record["recorded_at"] + timedelta(1)),
        as_received(record),
    )


def test_a_signed_item_left_out_or_an_unsigned_one_added_is_refused() -> None:
    key, record = new_key(), change()
    signed, body = sign_consent_change(key, record), as_received(record)
    with pytest.raises(SignatureRejected, match="missing"):
        check(signed, key.public(), {k: v for k, v in body.items() if k != "recorded_by"})
    with pytest.raises(SignatureRejected, match="no salt"):
        check(signed, key.public(), {**body, "extra": "x"})


def test_unsigned_headers_are_refused() -> None:
    with pytest.raises(SignatureRejected, match="unsigned"):
        read_signature([("ce_type", b"uk.gov.tellusonce.ConsentChanged")])
