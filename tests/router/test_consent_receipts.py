"""Consent receipts: Kantara-shaped, signed, verifiable by anyone with the published
keys (PyJWT and npm's jose, not only our own code), still verifiable after the key
rotates, and issued for the informant's choices at the desk as well as online."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt
from joserfc.jwk import OKPKey
from pydantic import SecretStr

from operators.services import RunningBus
from producers.accept import Intake
from producers.accounts import Submitter
from producers.requests import DeathRegistration
from router.consent_receipts import (
    ALGORITHM,
    ConsentReceiptIssuer,
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
from runtime.pseudonyms import subject_id_for
from runtime.sealing import new_data_key
from runtime.settings import Settings
from tests.support import death_registration, random_nino

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


def test_an_informants_receipt_says_how_the_choice_came_and_no_one_else_has_a_channel() -> None:
    subject = "n-" + "0" * 32

    def claims(recorded_by: str, channel: str | None) -> dict[str, Any]:
        return receipt_claims(
            Settings(),
            subject_id=subject,
            agency="dvla",
            event_type="DeathRegistered",
            choice="given",
            recorded_by=recorded_by,
            recorded_at=RECORDED_AT,
            receipt_id=uuid.uuid4(),
            issued_at=RECORDED_AT,
            channel=channel,
        )

    assert claims("informant", "phone")["collectionMethod"] == (
        "By telephone, by the informant (to a registrar, or to a contact-centre agent)"
    )
    assert claims("informant", "desk")["collectionMethod"] == claims("informant", None)["collectionMethod"]
    for recorded_by, channel in (("citizen", "phone"), ("informant", "carrier pigeon"), ("proxy", "desk")):
        with pytest.raises(ValueError, match="channel"):
            claims(recorded_by, channel)


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
    assert header["alg"] == "EdDSA"  # RFC 8037, what every JOSE library verifies
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
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
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
    with pytest.raises(UnknownReceiptKey, match=re.escape("/.well-known/consent-receipts/jwks.json")):
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
    # Published by the running service itself, where anyone can fetch it; still at its earlier address.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}", timeout=10) as client:
        response = await client.get("/.well-known/consent-receipts/jwks.json")
        earlier = await client.get("/consent-receipts/keys")
        office_keys = (await client.get("/.well-known/jwks.json")).json()
        # Nothing to send it: a write is refused, and junk in the query changes nothing.
        written = await client.post("/.well-known/consent-receipts/jwks.json", json={"keys": []})
        junk = await client.get("/.well-known/consent-receipts/jwks.json?kid=%27%00&" + "x=y&" * 200)

    assert written.status_code == 405
    assert junk.status_code == 200 and junk.json() == response.json()

    assert response.status_code == 200
    assert earlier.status_code == 200 and earlier.json() == response.json()
    # Apart from the offices' signing keys: an office's key must never pass for a receipt key.
    receipt_kids = {key["kid"] for key in response.json()["keys"]}
    assert not receipt_kids & {key["kid"] for key in office_keys["keys"]}
    assert response.headers["content-type"].startswith("application/jwk-set+json")
    assert response.headers["cache-control"] == "public, max-age=60"
    jwks = response.json()
    assert jwks == await published_keys(pool)
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert set(key) == {"kty", "crv", "alg", "use", "kid", "x", "created_at", "retired_at"}
        assert key["alg"] == "EdDSA" and key["use"] == "sig"
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


# --- receipts from the running service, checked by libraries that are not ours -----------------

NODE_VERIFIER = Path(__file__).resolve().parents[1] / "tools" / "verify_consent_receipt.mjs"


async def _node_jose(jwks_url: str, issuer: str, token: str) -> tuple[int, dict[str, Any]]:
    """npm's ``jose`` verifies ``token`` with the key set it fetches from ``jwks_url``."""
    node = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_VERIFIER),
        jwks_url,
        issuer,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=NODE_VERIFIER.parent.parent.parent,  # where node_modules/jose is
    )
    out, err = await asyncio.wait_for(node.communicate(token.encode()), timeout=60)
    assert node.returncode is not None
    assert out, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return node.returncode, answer


def _deceased(nino: str) -> dict[str, str]:
    return {"given_names": "Pat", "family_name": "Example", "date_of_birth": "1941-03-02", "nino": nino}


def _altered(token: str) -> str:
    """The token with one character of its claims changed."""
    header, payload, signature = token.split(".")
    middle = len(payload) // 2
    replacement = "A" if payload[middle] != "A" else "B"
    return ".".join([header, payload[:middle] + replacement + payload[middle + 1 :], signature])


@pytest.mark.integration
async def test_a_desk_consent_receipt_from_the_running_service_verifies_in_pyjwt_and_node_jose(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    nino = random_nino()
    registration = death_registration(deceased=_deceased(nino))
    headers = {"Idempotency-Key": f"receipts-{uuid.uuid4()}"}
    accepted = await intake.post("/v1/death-registrations", json=registration, headers=headers)
    assert accepted.status_code == 201, accepted.text
    answer = accepted.json()
    receipts = answer["consent_receipts"]
    assert [(r["agency"], r["choice"]) for r in receipts] == [("dvla", "given"), ("hmpo", "refused")]
    token = receipts[0]["receipt"]
    base_url = services.public_url.rstrip("/")
    jwks_url = f"{base_url}/.well-known/consent-receipts/jwks.json"

    # PyJWT, fetching the key set itself from the well-known URL (in a thread: the bus serves
    # on this event loop).
    signing_key = await asyncio.to_thread(pyjwt.PyJWKClient(jwks_url).get_signing_key_from_jwt, token)
    claims = pyjwt.decode(
        token,
        signing_key,
        algorithms=["EdDSA"],
        issuer=base_url,
        options={"require": ["iss", "sub", "iat", "jti"]},
    )
    subject = subject_id_for(nino, services.require_pseudonym_key())
    assert claims["sub"] == claims["piiPrincipalId"] == subject
    assert claims["jti"] == claims["consentReceiptID"] == receipts[0]["receipt_id"]
    assert claims["collectionMethod"] == "In person, by the informant at the register office desk"
    assert claims["consentChange"]["choice"] == "given"
    assert claims["consentChange"]["recordedBy"] == "informant"
    assert claims["consentChange"]["agency"] == "dvla"
    assert claims["consentChange"]["eventType"] == "DeathRegistered"
    assert pyjwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": signing_key.key_id, "typ": "JWT"}
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(_altered(token), signing_key, algorithms=["EdDSA"], issuer=base_url)

    # npm's jose under Node, fetching the same key set.
    status, verified = await _node_jose(jwks_url, base_url, token)
    assert status == 0, verified
    assert verified["claims"] == claims
    assert verified["header"]["kid"] == signing_key.key_id
    status, refused = await _node_jose(jwks_url, base_url, _altered(token))
    assert status == 1 and refused["error"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED", refused
    status, refused = await _node_jose(jwks_url, "https://someone-else.example", token)
    assert status == 1 and refused["error"] == "ERR_JWT_CLAIM_VALIDATION_FAILED", refused

    # The policy URL in the receipt is the service's privacy notice.
    async with httpx.AsyncClient(timeout=10) as anyone:
        notice = await anyone.get(claims["policyUrl"])
    assert notice.status_code == 200
    assert notice.headers["content-type"].startswith("text/html")
    assert '<h1 class="govuk-heading-l">Privacy notice</h1>' in notice.text

    # Both choices are stored with their receipts, each naming its consent row; sending the
    # same registration again answers the same receipts and issues no more.
    stored = await pool.fetch(
        "SELECT r.receipt_id::text AS receipt_id, r.agency, r.choice, r.token, c.recorded_by"
        "  FROM consent_receipt r JOIN consent_record c ON c.id = r.consent_record_id"
        " WHERE r.event_id = $1 ORDER BY c.id",
        uuid.UUID(answer["event_id"]),
    )
    assert [
        {"receipt_id": r["receipt_id"], "agency": r["agency"], "choice": r["choice"], "receipt": r["token"]}
        for r in stored
    ] == receipts
    assert {r["recorded_by"] for r in stored} == {"informant"}
    again = await intake.post("/v1/death-registrations", json=registration, headers=headers)
    assert again.status_code == 200 and again.json()["consent_receipts"] == receipts
    assert await pool.fetchval("SELECT count(*) FROM consent_receipt WHERE subject_id = $1", subject) == 2


@pytest.mark.integration
async def test_a_refused_registration_issues_no_receipt(
    intake: httpx.AsyncClient, pool: asyncpg.Pool, services: Settings
) -> None:
    nino = random_nino()
    subject = subject_id_for(nino, services.require_pseudonym_key())
    deceased = _deceased(nino)
    hostile: list[Any] = [
        [{"agency": "dwp", "choice": "given"}],  # told by law: no consent to give
        [{"agency": "dvla", "choice": "maybe"}],
        [{"agency": "dvla"}],
        [{"agency": "dvla", "choice": "given"}, {"agency": "dvla", "choice": "refused"}],
        [{"agency": "../../etc/passwd", "choice": "given"}],
        [{"agency": "dvla' OR '1'='1", "choice": "given"}],
        [{"agency": "dvla", "choice": "given", "extra": "field"}],
        [{"agency": "x" * 10_000, "choice": "given"}],
        [{"agency": "dvla", "choice": "given"}] * 51,
        "dvla",
        None,
    ]
    for consents in hostile:
        refused = await intake.post(
            "/v1/death-registrations", json=death_registration(deceased=deceased, consents=consents)
        )
        assert refused.status_code == 422, (consents, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert any(e["field"].startswith("consents") for e in refused.json()["errors"]), refused.text
    assert await pool.fetchval("SELECT count(*) FROM consent_receipt WHERE subject_id = $1", subject) == 0
    assert await pool.fetchval("SELECT count(*) FROM consent_record WHERE subject_id = $1", subject) == 0


@pytest.mark.integration
async def test_when_the_receipt_cannot_be_signed_the_registration_is_not_recorded(
    pool: asyncpg.Pool, services: Settings
) -> None:
    """A choice is stored with its receipt or not at all: the event waits for both."""
    await _receipt(pool, services)  # the receipt key exists, sealed with the service's data key
    wrong_key = services.model_copy(update={"data_key": SecretStr(new_data_key())})
    desk = Intake(services, pool, receipts=ConsentReceiptIssuer(wrong_key))
    registrar = Submitter("leeds", "Leeds", "registrar", "registrar:receipt-test", "Receipt Test")
    nino = random_nino()
    submission = DeathRegistration.model_validate(
        death_registration(
            deceased={
                "given_names": "Pat",
                "family_name": "Example",
                "date_of_birth": "1941-03-02",
                "nino": nino,
            }
        )
    )
    subject = subject_id_for(nino, services.require_pseudonym_key())

    with pytest.raises(ReceiptKeyUnavailable):
        await desk.accept(submission, registrar, None)

    for table in ("intake_record", "consent_record", "consent_receipt"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE subject_id = $1", subject) == 0
