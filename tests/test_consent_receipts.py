"""Consent receipts: Kantara-shaped, signed, verifiable by anyone with the published
keys, and still verifiable after the key rotates."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt
from joserfc.jwk import OKPKey
from pydantic import SecretStr

from citizens.consent_receipts import (
    ALGORITHM,
    InvalidConsentReceipt,
    NotPseudonymous,
    ReceiptKeyUnavailable,
    UnknownReceiptKey,
    issue_consent_receipt,
    published_keys,
    receipt_claims,
    rotate_receipt_key,
    verify_consent_receipt,
)
from producers.accept import subject_id_for
from runtime.sealing import new_data_key
from runtime.services import RunningBus
from runtime.settings import Settings

NINO = "AB123456C"
NAME = "Margaret Thornton"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
RECORDED_AT = datetime(2026, 11, 2, 9, 30, 15, 123456, tzinfo=UTC)


def _subject(settings: Settings) -> str:
    return subject_id_for(NINO, settings.require_pseudonym_key())


async def _receipt(pool: asyncpg.Pool, settings: Settings, **changes: Any) -> str:
    values: dict[str, Any] = {
        "subject_id": _subject(settings),
        "agency": "dvla",
        "event_type": "DeathRegistered",
        "choice": "withdrawn",
        "recorded_by": "proxy",
        "recorded_at": RECORDED_AT,
    }
    return await issue_consent_receipt(pool, settings, **(values | changes))


def _decoded(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


def test_a_receipt_is_refused_for_a_nino_or_a_name_instead_of_a_pseudonymous_subject() -> None:
    for subject in (NINO, "AB 12 34 56 C", NAME):
        with pytest.raises(NotPseudonymous, match="pseudonymous subject id"):
            receipt_claims(
                Settings(),
                subject_id=subject,
                agency="dvla",
                event_type="DeathRegistered",
                choice="given",
                recorded_by="citizen",
                recorded_at=RECORDED_AT,
                receipt_id=uuid.uuid4(),
                issued_at=RECORDED_AT,
            )


def test_garbage_is_not_a_receipt() -> None:
    for token in ("", "abc", "a.b", "a.b.c.d", "!!.??.**"):
        with pytest.raises(InvalidConsentReceipt, match="not a valid consent receipt"):
            verify_consent_receipt(token, {"keys": []})


@pytest.mark.integration
async def test_a_receipt_verifies_with_the_published_key_and_holds_the_kantara_fields(
    pool: asyncpg.Pool, services: Settings
) -> None:
    receipt_id = uuid.uuid4()
    token = await _receipt(pool, services, receipt_id=receipt_id)

    claims = verify_consent_receipt(token, await published_keys(pool))

    subject = _subject(services)
    base_url = services.public_url.rstrip("/")
    assert claims["version"] == "KI-CR-v1.1.0"
    assert claims["jurisdiction"] == "GB"
    assert claims["language"] == "en"
    assert claims["consentTimestamp"] == int(RECORDED_AT.timestamp())
    assert claims["collectionMethod"] == "Online, by a proxy the citizen appointed"
    assert claims["consentReceiptID"] == claims["jti"] == str(receipt_id)
    assert claims["piiPrincipalId"] == claims["sub"] == subject
    assert claims["piiControllers"][0]["piiController"] == "Tell Us Once"
    assert claims["policyUrl"] == f"{base_url}/privacy"
    assert claims["iss"] == base_url
    assert claims["sensitive"] is False and claims["spiCat"] == []
    [service] = claims["services"]
    assert service["service"] == "Telling dvla about death registrations"
    [purpose] = service["purposes"]
    assert purpose["consentType"] == "EXPLICIT"
    assert purpose["thirdPartyDisclosure"] is True and purpose["thirdPartyName"] == "dvla"
    assert purpose["primaryPurpose"] is True
    assert claims["consentChange"] == {
        "choice": "withdrawn",
        "recordedBy": "proxy",
        "recordedAt": "2026-11-02T09:30:15.123456Z",
        "agency": "dvla",
        "eventType": "DeathRegistered",
    }
    header = json.loads(_decoded(token)[0])
    assert header["alg"] == ALGORITHM
    assert header["kid"] in {key["kid"] for key in (await published_keys(pool))["keys"]}


@pytest.mark.integration
async def test_changing_any_one_character_of_a_receipt_makes_it_fail(
    pool: asyncpg.Pool, services: Settings
) -> None:
    token = await _receipt(pool, services)
    jwks = await published_keys(pool)
    header_end, payload_end = token.index("."), token.rindex(".")
    # Every position: header, payload and signature, including each part's last character,
    # where a careless decoder would ignore the unused low bits.
    for position, char in enumerate(token):
        if char == ".":
            continue
        replacement = BASE64URL[(BASE64URL.index(char) + 1) % len(BASE64URL)]
        altered = token[:position] + replacement + token[position + 1 :]
        with pytest.raises(InvalidConsentReceipt):
            verify_consent_receipt(altered, jwks)
    for last in (header_end - 1, payload_end - 1, len(token) - 1):
        for replacement in BASE64URL.replace(token[last], ""):
            altered = token[:last] + replacement + token[last + 1 :]
            with pytest.raises(InvalidConsentReceipt):
                verify_consent_receipt(altered, jwks)
    assert verify_consent_receipt(token, jwks)["consentChange"]["choice"] == "withdrawn"


@pytest.mark.integration
async def test_a_receipt_signed_by_another_key_fails(pool: asyncpg.Pool, services: Settings) -> None:
    genuine = await _receipt(pool, services)
    jwks = await published_keys(pool)
    header = json.loads(_decoded(genuine)[0])
    claims = json.loads(_decoded(genuine)[1])
    impostor = OKPKey.import_key(Ed25519PrivateKey.generate())

    same_kid = jwt.encode(header, claims, impostor, algorithms=[ALGORITHM])
    with pytest.raises(InvalidConsentReceipt, match="signature does not hold"):
        verify_consent_receipt(same_kid, jwks)

    own_kid = jwt.encode(header | {"kid": impostor.thumbprint()}, claims, impostor, algorithms=[ALGORITHM])
    with pytest.raises(UnknownReceiptKey, match="/consent-receipts/keys"):
        verify_consent_receipt(own_kid, jwks)

    # Nor does passing the impostor's key off as a published key under the genuine id.
    forged_set = {"keys": [impostor.as_dict(private=False) | {"kid": header["kid"]}]}
    with pytest.raises(InvalidConsentReceipt, match="not the key its id names"):
        verify_consent_receipt(same_kid, forged_set)


@pytest.mark.integration
async def test_after_rotation_old_receipts_still_verify_and_new_ones_use_the_new_key(
    pool: asyncpg.Pool, services: Settings
) -> None:
    before = await _receipt(pool, services, choice="given", recorded_by="citizen")
    old_kid = json.loads(_decoded(before)[0])["kid"]

    new_kid = await rotate_receipt_key(pool, services)
    after = await _receipt(pool, services, choice="refused", recorded_by="informant")

    assert new_kid != old_kid
    assert json.loads(_decoded(after)[0])["kid"] == new_kid
    jwks = await published_keys(pool)
    published = {key["kid"]: key for key in jwks["keys"]}
    assert published[old_kid]["retired_at"] is not None
    assert published[new_kid]["retired_at"] is None
    assert verify_consent_receipt(before, jwks)["consentChange"]["choice"] == "given"
    assert verify_consent_receipt(after, jwks)["consentChange"]["choice"] == "refused"


@pytest.mark.integration
async def test_the_published_keys_hold_no_private_key_material(
    pool: asyncpg.Pool, services: Settings, bus: RunningBus
) -> None:
    await _receipt(pool, services)
    # Published by the running service itself, where anyone can fetch it.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as client:
        response = await client.get("/consent-receipts/keys")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jwk-set+json")
    assert response.headers["cache-control"] == "public, max-age=60"
    jwks = response.json()
    assert jwks == await published_keys(pool)
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert set(key) == {"kty", "crv", "alg", "use", "kid", "x", "created_at", "retired_at"}
        assert OKPKey.import_key({k: key[k] for k in ("kty", "crv", "x")}).is_private is False
    # The stored private key is sealed: it opens only with the data key.
    stored = await pool.fetch("SELECT sealed_private_key FROM consent_receipt_key")
    assert all(len(row["sealed_private_key"]) > 32 for row in stored)
    with pytest.raises(ReceiptKeyUnavailable, match="TUO_DATA_KEYS_PREVIOUS"):
        await _receipt(pool, services.model_copy(update={"data_key": SecretStr(new_data_key())}))


@pytest.mark.integration
async def test_a_receipt_carries_no_nino_and_no_name(pool: asyncpg.Pool, services: Settings) -> None:
    token = await _receipt(pool, services)
    readable = b"".join(_decoded(token)[:2]).decode()

    for personal in (NINO, "AB 12 34 56 C", NAME, "Thornton"):
        assert personal.lower() not in readable.lower()
        assert personal.lower() not in token.lower()
    assert json.loads(_decoded(token)[1])["piiPrincipalId"].startswith("n-")
