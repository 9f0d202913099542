"""Office signatures: an agency can prove the fields it received came from the
registration office, without trusting the broker or the router, and without
learning the fields it was not given.

Unit tests need no broker; the integration tests run the whole bus and feed it
tampered messages on ``tuo.life-events`` and on an agency's own topic."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.services import RunningBus
from producers.key_registry import key_registry_router
from producers.office_keys import SigningKey, create_key
from router.messages import disclosed_items
from router.minimise import event_fields, minimise, minimise_envelope
from runtime.kafka import Topics
from runtime.keyring import HttpKeySource, KeyRing
from runtime.sealing import PayloadSealer
from runtime.settings import Settings
from schemas import UndecodableMessage, decode, encode
from schemas.catalogue import DISCLOSURE_SUFFIX, LIFE_EVENTS, MINIMISED
from schemas.signatures import (
    DIGEST_PATTERN,
    MANIFEST_HEADER,
    SALT_PATTERN,
    SALTS_HEADER,
    SIG_HEADER,
    OfficeKey,
    SignatureRejected,
    SignedEvent,
    UnsignableValue,
    b64encode,
    canonical,
    canonical_json,
    disclosing,
    item_path,
    office_source,
    read_signature,
    sign,
    signature_headers,
    verify,
)
from tests.golden.make_vectors import EXAMPLES
from tests.support import death_message, eventually, header, inspector_producer, office_key, read_topic

OFFICE = "leeds"
KEY_CREATED = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Key:
    """A signing key and its published half, without a database."""

    signing: SigningKey
    published: OfficeKey


def new_key(office: str = OFFICE, retired_at: datetime | None = None) -> Key:
    private = Ed25519PrivateKey.generate()
    key_id = f"{office}.{uuid.uuid4().hex[:8]}"
    return Key(
        SigningKey(key_id, office, private),
        OfficeKey(key_id, office, private.public_key(), KEY_CREATED, retired_at),
    )


KEY = new_key()


def example(event_type: str, office: str = OFFICE) -> dict[str, Any]:
    record = copy.deepcopy(EXAMPLES[event_type])
    record["envelope"] = {**record["envelope"], "registration_office": office, "event_id": str(uuid.uuid4())}
    return record


def signed_message(
    event_type: str, key: Key = KEY, record: dict[str, Any] | None = None
) -> tuple[bytes, list[tuple[str, bytes]], str]:
    """(value, signature headers, event id) as intake publishes them."""
    record = record or example(event_type, key.signing.office)
    event_id = str(record["envelope"]["event_id"])
    return (
        encode(event_type, record),
        signature_headers(key.signing, event_type, record, event_id),
        event_id,
    )


def check(
    value: bytes,
    headers: list[tuple[str, bytes]],
    event_id: str,
    key: OfficeKey | None = KEY.published,
    *,
    event_type: str | None = None,
    source: str | None = None,
    complete: bool = False,
) -> None:
    """Verify as an agency would: decode the value, then the signature over what it holds."""
    name, body = decode(value)
    verify(
        read_signature(headers),
        key,
        event_type=event_type or name.removesuffix(DISCLOSURE_SUFFIX),
        event_id=event_id,
        source=source or office_source(key.office if key else OFFICE),
        body=body,
        complete=complete,
    )


def agency_copy(
    event_type: str, value: bytes, headers: list[tuple[str, bytes]], granted: frozenset[str]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """What the router sends an agency granted ``granted``: minimised, salts for those only."""
    _, body = decode(value)
    copy_ = minimise(event_type, body, granted)
    minimised = encode(f"{event_type}{DISCLOSURE_SUFFIX}", copy_)
    return minimised, read_signature(headers).headers(disclose=disclosed_items(event_type, copy_))


def salts_in(headers: list[tuple[str, bytes]]) -> set[str]:
    return set(read_signature(headers).salts)


def disclosed_paths(headers: list[tuple[str, bytes]]) -> set[str]:
    """The field paths whose salts a copy's headers disclose (``next_of_kin/0.person`` → its path)."""
    return {item_path(name) for name in salts_in(headers)}


def with_header(headers: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(k, value if k == name else v) for k, v in headers]


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


def change_one_byte_of(value: bytes, text: bytes) -> bytes:
    """The value with one byte of ``text`` (a string inside it) changed; it still decodes."""
    position = value.index(text) + len(text) - 1
    return flip(value, position)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", LIFE_EVENTS)
def test_a_signed_event_verifies_whole(event_type: str) -> None:
    value, headers, event_id = signed_message(event_type)
    check(value, headers, event_id, complete=True)


@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_any_minimised_copy_verifies_and_carries_no_withheld_salts(data: st.DataObject) -> None:
    event_type = data.draw(st.sampled_from(MINIMISED))
    record = example(event_type)
    grantable = sorted(event_fields(event_type))
    granted = frozenset(data.draw(st.lists(st.sampled_from(grantable), unique=True)))
    value, headers, event_id = signed_message(event_type, record=record)
    delivered, delivered_headers = agency_copy(event_type, value, headers, granted)
    check(delivered, delivered_headers, event_id)
    assert disclosed_paths(delivered_headers) <= {"envelope"} | granted, "withheld paths' salts are absent"
    withheld = set(grantable) - granted
    assert set(decode(delivered)[1]["withheld_fields"]) == withheld


def test_a_minimised_copy_does_not_verify_as_the_whole_event() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    delivered, delivered_headers = agency_copy("DeathRegistered", value, headers, frozenset({"deceased"}))
    with pytest.raises(SignatureRejected, match="missing"):
        check(delivered, delivered_headers, event_id, complete=True)


# Values as intake may hand them over before Avro has normalised them: times in any
# zone, UUIDs as text, optional members present or absent, any Unicode text.
_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
_moments = st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)
_person = st.fixed_dictionaries(
    {
        "given_names": _text,
        "family_name": _text,
        "date_of_birth": st.none() | st.dates(min_value=date(1800, 1, 1), max_value=date(2100, 1, 1)),
    }
)
_address = st.fixed_dictionaries(
    {
        "lines": st.lists(_text, min_size=1, max_size=5),
        "town": _text,
        "postcode": _text,
        "uprn": st.none() | st.from_regex(r"\A[0-9]{1,12}\Z"),
    }
)
_related = st.fixed_dictionaries(
    {
        "person": _person,
        "relationship": _text,
        "nino": st.none() | _text,
        "address": st.none() | _address,
    }
)


@st.composite
def deaths(draw: st.DrawFn) -> dict[str, Any]:
    event_id = draw(st.uuids())
    return {
        "envelope": {
            "event_id": draw(st.sampled_from([event_id, str(event_id), str(event_id).upper()])),
            "reference": draw(_text),
            "occurred_at": draw(_moments),
            "recorded_at": draw(_moments),
            "subject": {"subject_id": draw(_text), "nino": draw(st.none() | _text)},
            "informant": {"name": draw(_text), "relationship": draw(_text)},
            "channel": draw(st.sampled_from(["DESK", "PHONE", "ONLINE", "SYSTEM"])),
            "registration_office": OFFICE,
            "provenance": {"source_system": draw(_text), "recorded_by": draw(_text)},
        },
        "deceased": draw(_person),
        "date_of_death": draw(st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 1, 1))),
        "place_of_death": draw(_text),
        "last_address": draw(_address),
        "surviving_partner": draw(st.none() | _related),
        "next_of_kin": draw(st.lists(_related, max_size=3)),
        "executor": draw(st.none() | _related),
    }


@given(record=deaths(), data=st.data())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_what_an_agency_decodes_hashes_as_intake_signed_it(
    record: dict[str, Any], data: st.DataObject
) -> None:
    event_id = str(uuid.UUID(str(record["envelope"]["event_id"])))
    headers = signature_headers(KEY.signing, "DeathRegistered", record, event_id)
    value = encode("DeathRegistered", record)
    check(value, headers, event_id, complete=True)
    grantable = sorted(event_fields("DeathRegistered"))
    granted = frozenset(data.draw(st.lists(st.sampled_from(grantable), unique=True)))
    delivered, delivered_headers = agency_copy("DeathRegistered", value, headers, granted)
    check(delivered, delivered_headers, event_id)


# --- tampering --------------------------------------------------------------------------------


def test_one_byte_of_the_payload_changed_after_signing_is_rejected() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    tampered = change_one_byte_of(value, b"Leeds General Infirmary")
    assert decode(tampered)[1]["place_of_death"] == "Leeds General Infirmarx", "it still decodes"
    with pytest.raises(SignatureRejected, match="place_of_death is not what the office signed"):
        check(tampered, headers, event_id)


def test_one_byte_of_a_delivered_copy_changed_is_rejected_by_the_agency() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    delivered, delivered_headers = agency_copy("DeathRegistered", value, headers, frozenset({"deceased"}))
    with pytest.raises(SignatureRejected, match="deceased is not what the office signed"):
        check(change_one_byte_of(delivered, b"Example-Smith"), delivered_headers, event_id)


@pytest.mark.parametrize("event_type", ["DeathRegistered", "EventCorrected"])
def test_no_single_byte_change_anywhere_in_the_value_is_accepted(event_type: str) -> None:
    value, headers, event_id = signed_message(event_type)
    original = decode(value)[1]
    for position in range(len(value)):
        for mask in (0x01, 0x80):
            tampered = flip(value, position, mask)
            try:
                name, body = decode(tampered)
            except UndecodableMessage:
                continue
            try:
                check(tampered, headers, event_id, event_type=event_type)
            except SignatureRejected:
                continue
            assert (name, body) == (event_type, original), f"byte {position} changed and was accepted"


@pytest.mark.parametrize("name", [MANIFEST_HEADER, SIG_HEADER, SALTS_HEADER])
def test_one_byte_of_the_signature_headers_changed_is_rejected(name: str) -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    original = dict(headers)[name]
    for position in range(len(original)):
        tampered = with_header(headers, name, flip(original, position))
        with pytest.raises(SignatureRejected):
            check(value, tampered, event_id, complete=True)  # as the router checks a whole event
        if name != SALTS_HEADER:
            with pytest.raises(SignatureRejected):
                check(value, tampered, event_id)  # as an agency checks its copy


def test_a_changed_salt_is_rejected_by_the_agency() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    delivered, delivered_headers = agency_copy("DeathRegistered", value, headers, frozenset({"deceased"}))
    signed = read_signature(delivered_headers)
    for name in signed.salts:
        salts = {**signed.salts, name: "A" * 22}
        forged = SignedEvent(signed.manifest, signed.manifest_bytes, signed.signature, salts).headers()
        with pytest.raises(SignatureRejected, match=f"{name} is not what the office signed"):
            check(delivered, forged, event_id)


def test_another_offices_key_is_rejected() -> None:
    bradford = new_key("bradford")
    value, headers, event_id = signed_message("DeathRegistered")
    with pytest.raises(SignatureRejected, match="does not verify"):
        check(
            value,
            headers,
            event_id,
            OfficeKey(KEY.published.key_id, OFFICE, bradford.published.public_key, KEY_CREATED),
        )
    # Bradford signing an event that says it was registered in Leeds:
    record = example("DeathRegistered", office="bradford")
    value, headers, event_id = signed_message("DeathRegistered", bradford, record)
    record["envelope"]["registration_office"] = OFFICE
    forged = encode("DeathRegistered", record)
    with pytest.raises(SignatureRejected, match="envelope is not what the office signed"):
        check(forged, headers, event_id, bradford.published)
    with pytest.raises(ValueError, match="belongs to bradford"):
        sign(bradford.signing, "DeathRegistered", decode(forged)[1])


def test_an_event_claiming_another_source_is_rejected() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    with pytest.raises(SignatureRejected, match="ce_source"):
        check(value, headers, event_id, source="/offices/bradford")


def test_an_unknown_key_or_an_unsigned_event_is_rejected() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    with pytest.raises(SignatureRejected, match="not in the key registry"):
        check(value, headers, event_id, key=None)
    with pytest.raises(SignatureRejected, match="unsigned"):
        read_signature([])
    with pytest.raises(SignatureRejected, match="tuo_sig_salts header is missing"):
        read_signature([h for h in headers if h[0] != SALTS_HEADER])
    with pytest.raises(SignatureRejected, match="appears twice"):
        read_signature([*headers, headers[0]])


def test_a_key_retired_before_the_event_was_recorded_is_rejected() -> None:
    record = example("DeathRegistered")
    recorded_at = record["envelope"]["recorded_at"]
    value, headers, event_id = signed_message("DeathRegistered", record=record)
    retired = dict(vars(KEY.published))
    check(
        value, headers, event_id, OfficeKey(**{**retired, "retired_at": recorded_at + timedelta(seconds=1)})
    )
    with pytest.raises(SignatureRejected, match="retired"):
        check(value, headers, event_id, OfficeKey(**{**retired, "retired_at": recorded_at}))


def test_the_signature_is_for_one_event_only() -> None:
    _, headers, _ = signed_message("DeathRegistered")
    other, _, other_id = signed_message("DeathRegistered")
    with pytest.raises(SignatureRejected, match="signed event"):
        check(other, headers, other_id)


def test_a_nino_or_field_the_router_adds_without_a_salt_is_rejected() -> None:
    value, headers, event_id = signed_message("DeathRegistered")
    granted = frozenset({"deceased", "surviving_partner.person"})
    delivered, delivered_headers = agency_copy("DeathRegistered", value, headers, granted)
    _, body = decode(delivered)
    assert body["envelope"]["subject"]["nino"] is None
    assert body["surviving_partner"]["person"] is not None and body["surviving_partner"]["nino"] is None
    with_nino = copy.deepcopy(body)
    with_nino["envelope"]["subject"]["nino"] = "AB123456C"
    with pytest.raises(SignatureRejected, match="nino is not covered"):
        check(encode("DeathRegisteredDisclosure", with_nino), delivered_headers, event_id)
    with_informant = copy.deepcopy(body)
    with_informant["envelope"]["informant"]["name"] = "Alex Example"
    with pytest.raises(SignatureRejected, match=r"informant\.name is not covered"):
        check(encode("DeathRegisteredDisclosure", with_informant), delivered_headers, event_id)
    with_partner_nino = copy.deepcopy(body)
    with_partner_nino["surviving_partner"]["nino"] = "AB123456C"
    with pytest.raises(SignatureRejected, match=r"surviving_partner\.nino is not covered"):
        check(encode("DeathRegisteredDisclosure", with_partner_nino), delivered_headers, event_id)
    with_field = {**body, "place_of_death": "Leeds General Infirmary"}
    with pytest.raises(SignatureRejected, match="place_of_death is not covered"):
        check(encode("DeathRegisteredDisclosure", with_field), delivered_headers, event_id)


def test_a_correction_delivers_a_subset_of_its_changes_and_still_verifies() -> None:
    record = example("EventCorrected")
    record["changes"] = [
        {"field": "deceased.date_of_birth", "new_value_json": '"1941-03-12"'},
        {"field": "executor.person.family_name", "new_value_json": '"Smith"'},
        {"field": "last_address.town", "new_value_json": '"Otley"'},
    ]
    value, headers, event_id = signed_message("EventCorrected", record=record)
    signed = read_signature(headers)
    subset = {**decode(value)[1], "changes": [record["changes"][0], record["changes"][2]]}
    disclose = {"envelope", "corrects_event_id", "corrects_reference", "corrected_event_type", "reason"}
    disclose |= {"previous_subject_id", "new_subject_id"}  # the example corrects the NINO too
    kept = signed.headers(disclose=disclose | {"changes/0", "changes/2"})
    check(encode("EventCorrectedDisclosure", {**subset, "envelope": _no_nino(subset)}), kept, event_id)
    reordered = {**subset, "changes": subset["changes"][::-1], "envelope": _no_nino(subset)}
    with pytest.raises(SignatureRejected, match="changes/0 is not what the office signed"):
        check(encode("EventCorrectedDisclosure", reordered), kept, event_id)
    added = {**subset, "changes": record["changes"], "envelope": _no_nino(subset)}
    with pytest.raises(SignatureRejected, match="3 elements but salts for 2"):
        check(encode("EventCorrectedDisclosure", added), kept, event_id)


def _no_nino(record: dict[str, Any]) -> dict[str, Any]:
    """The envelope without its personal fields (nothing of them granted)."""
    return minimise_envelope(record["envelope"], frozenset())


# --- the canonical form -----------------------------------------------------------------------


def test_canonical_form_of_each_avro_type() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    value = {
        "when": datetime(2026, 11, 21, 15, 0, 15, 7, tzinfo=ist),
        "naive": datetime(2026, 11, 21, 9, 30),
        "day": date(999, 1, 2),
        "id": uuid.UUID("0B9E7C1E-3C1A-4D6E-9A57-3F1F6D0C2A11"),
        "gone": None,
        "list": [None, 1, True, "é"],
        "nested": {"z": 1, "a": {"b": None}},
    }
    assert (
        canonical_json(canonical(value))
        == (
            '{"day":"0999-01-02","id":"0b9e7c1e-3c1a-4d6e-9a57-3f1f6d0c2a11","list":[null,1,true,"é"],'
            '"naive":"2026-11-21T09:30:00.000000Z","nested":{"a":{},"z":1},'
            '"when":"2026-11-21T09:30:15.000007Z"}'
        ).encode()
    )
    for unsupported in (1.5, b"raw", {1: "x"}):
        with pytest.raises(UnsignableValue):
            canonical(unsupported)


def test_the_manifest_names_the_key_the_event_and_sorted_digests() -> None:
    _, headers, event_id = signed_message("EventVoided")
    signed: SignedEvent = read_signature(headers)
    manifest = dict(headers)[MANIFEST_HEADER]
    assert manifest.startswith(b'{"alg":"Ed25519","digests":["')
    assert signed.manifest.event_id == event_id and signed.manifest.key_id == KEY.published.key_id
    # the envelope, its four personal fields (nino, informant.name, informant.relationship,
    # recorded_by) and the void's four fields
    assert len(signed.manifest.digests) == len(signed.salts) == 9
    assert len(signed.signature) == 64 and all(len(s) == 22 for s in signed.salts.values())  # 16 bytes


@given(salt=st.binary(min_size=16, max_size=16), sha=st.binary(min_size=32, max_size=32))
def test_salts_and_digests_have_one_spelling_each(salt: bytes, sha: bytes) -> None:
    assert SALT_PATTERN.fullmatch(b64encode(salt)) and DIGEST_PATTERN.fullmatch(b64encode(sha))
    other_salt = b64encode(salt)[:-1] + chr(ord(b64encode(salt)[-1]) + 1)  # the unused bits set
    assert not SALT_PATTERN.fullmatch(other_salt)


# --- the key ring -----------------------------------------------------------------------------


class CountingSource:
    def __init__(self, keys: list[OfficeKey]) -> None:
        self.keys = keys
        self.reads = 0

    async def fetch(self) -> list[OfficeKey]:
        self.reads += 1
        return list(self.keys)


async def test_the_key_ring_reads_again_once_for_an_unknown_key_then_gives_up() -> None:
    now = [0.0]
    source = CountingSource([KEY.published])
    ring = KeyRing(source, max_age_seconds=60, clock=lambda: now[0])
    assert await ring.resolve([KEY.published.key_id]) == {KEY.published.key_id: KEY.published}
    assert await ring.resolve([KEY.published.key_id]) and source.reads == 1, "cached"
    assert await ring.resolve(["nobody.1"]) == {} and source.reads == 2, "unknown: one more read"
    rotated = new_key()
    source.keys.append(rotated.published)
    assert await ring.resolve([rotated.published.key_id]) and source.reads == 3, "a new key is found"
    now[0] = 61
    assert await ring.resolve([KEY.published.key_id]) and source.reads == 4, "stale: read again"


# --- against the database, the key registry and the running bus -------------------------------


@pytest.mark.integration
async def test_key_registry_publishes_active_and_retired_keys_over_http(
    pool: asyncpg.Pool, services: Settings
) -> None:
    office = f"sig-{uuid.uuid4().hex[:8]}"
    first = await office_key(pool, services, office)
    async with pool.acquire() as conn:
        second = await create_key(conn, office, PayloadSealer.from_settings(services))
    app = FastAPI()
    app.include_router(key_registry_router(lambda: pool))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake") as client:
        published = {k["key_id"]: k for k in (await client.get("/v1/signing-keys")).json()}
        assert published[first.key_id]["retired_at"] is not None
        assert published[second]["retired_at"] is None
        assert published[second]["algorithm"] == "Ed25519" and published[second]["office"] == office
        jwks = (await client.get("/.well-known/jwks.json")).json()
        jwk = next(k for k in jwks["keys"] if k["kid"] == second)
        assert (jwk["kty"], jwk["crv"], jwk["x"]) == ("OKP", "Ed25519", published[second]["public_key"])

        ring = KeyRing(HttpKeySource("http://intake", client))
        keys = await ring.resolve([first.key_id, second])
        assert keys[first.key_id].retired_at is not None and keys[second].office == office

    # An event the first key signed before it was retired still verifies; one recorded after does not.
    record = example("DeathRegistered", office)
    record["envelope"]["recorded_at"] = keys[first.key_id].created_at
    value, headers, event_id = signed_message("DeathRegistered", Key(first, keys[first.key_id]), record)
    check(value, headers, event_id, keys[first.key_id])
    record = example("DeathRegistered", office)
    record["envelope"]["recorded_at"] = datetime.now(UTC)
    value, headers, event_id = signed_message("DeathRegistered", Key(first, keys[first.key_id]), record)
    with pytest.raises(SignatureRejected, match="retired"):
        check(value, headers, event_id, keys[first.key_id])


async def _produce(
    settings: Settings, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    producer = inspector_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=key.encode(), headers=headers)
    finally:
        await producer.stop()


async def _dead_letter_reason(settings: Settings, event_id: str, component: str) -> str:
    topics = Topics(settings.topic_prefix)
    kind, _, agency = component.partition(":")
    topic = topics.agency_dead_letters(agency) if kind == "agency" else topics.dead_letters

    async def found() -> str | None:
        for record in await read_topic(settings, topic):
            if header(record, "ce_id") == event_id and header(record, "tuo_dlq_component") == component:
                return header(record, "tuo_dlq_reason")
        return None

    return await eventually(found, timeout=60, what=f"{event_id} dead-lettered by {component}")


async def _receipts(settings: Settings, agency: str, event_id: str) -> list[str]:
    found = []
    for record in await read_topic(settings, Topics(settings.topic_prefix).receipts(agency)):
        receipt = decode(record.value or b"")[1]
        if str(receipt["event_id"]) == event_id:
            found.append(receipt["outcome"])
    return found


STATUTORY = ("hmrc", "dwp", "council-leeds")  # for a death at a Leeds address, whatever the consent


@pytest.mark.integration
async def test_a_signed_event_is_delivered_and_verifies_at_each_agency(
    bus: RunningBus, pool: asyncpg.Pool, services: Settings
) -> None:
    key = await office_key(pool, services)
    subject_id = f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject_id, nino="AB123456C", key=key)
    await _produce(services, Topics(services.topic_prefix).life_events, subject_id, value, headers)

    async def handled_everywhere() -> bool:
        # A receipt at all means the SDK verified the copy and handed it to the agency's
        # handler (one that fails verification is dead-lettered with no receipt). The
        # council holds no household for this made-up person, so it may reject it.
        for agency in STATUTORY:
            if not {"APPLIED", "REJECTED"} & set(await _receipts(services, agency, event_id)):
                return False
        return True

    await eventually(handled_everywhere, timeout=60, what="receipts from hmrc, dwp and council-leeds")
    for agency in ("hmrc", "dwp"):  # they hold records for this NINO (a repeat may be receipted again)
        assert set(await _receipts(services, agency, event_id)) == {"APPLIED"}, agency
    keys = await KeyRing.from_database(pool).resolve([key.key_id])
    for agency in STATUTORY:
        (copy_,) = [
            r
            for r in await read_topic(services, Topics(services.topic_prefix).agency(agency))
            if header(r, "ce_id") == event_id
        ]
        check(copy_.value or b"", list(copy_.headers), event_id, keys[key.key_id])
        _, body = decode(copy_.value or b"")
        disclosed = disclosed_paths(list(copy_.headers))
        granted = event_fields("DeathRegistered") - set(body["withheld_fields"])
        assert disclosed <= {"envelope"} | granted
        assert "envelope" in disclosed and disclosed & granted, f"{agency} can check what it got"
        assert not disclosed & set(body["withheld_fields"]), f"{agency} got salts of withheld fields"
    council = next(
        r
        for r in await read_topic(services, Topics(services.topic_prefix).agency("council-leeds"))
        if header(r, "ce_id") == event_id
    )
    assert "nino" not in salts_in(list(council.headers)), "the council is not granted the NINO"


@pytest.mark.integration
async def test_a_life_event_tampered_after_signing_is_dead_lettered_by_the_router(
    bus: RunningBus, pool: asyncpg.Pool, services: Settings
) -> None:
    topics = Topics(services.topic_prefix)
    subject_id = f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject_id, key=await office_key(pool, services))
    tampered = change_one_byte_of(value, b"Leeds General Infirmary")
    await _produce(services, topics.life_events, subject_id, tampered, headers)
    reason = await _dead_letter_reason(services, event_id, "router")
    assert reason.startswith("signature rejected: place_of_death is not what the office signed"), reason

    # The next, untampered event is routed, so the tampered one was judged and not merely late.
    later_id, later, later_headers = death_message(subject_id, key=await office_key(pool, services))
    await _produce(services, topics.life_events, subject_id, later, later_headers)

    async def routed() -> bool:
        return later_id in {header(r, "ce_id") for r in await read_topic(services, topics.agency("hmrc"))}

    await eventually(routed, timeout=60, what="the next event at hmrc")
    decided = {header(r, "ce_id") for r in await read_topic(services, topics.routing_decisions)}
    assert f"{later_id}/hmrc" in decided and not any(d.startswith(event_id) for d in decided if d)
    for agency in (*STATUTORY, "dvla", "hmpo", "council-bradford"):
        ids = {header(r, "ce_id") for r in await read_topic(services, topics.agency(agency))}
        assert event_id not in ids, f"{agency} received the tampered event"


@pytest.mark.integration
async def test_a_tampered_message_on_an_agency_topic_is_dead_lettered_by_the_sdk(
    bus: RunningBus, pool: asyncpg.Pool, services: Settings
) -> None:
    topics = Topics(services.topic_prefix)
    subject_id = f"s-{uuid.uuid4().hex}"
    event_id, value, headers = death_message(subject_id, key=await office_key(pool, services))
    delivered, delivered_headers = agency_copy(
        "DeathRegistered", value, headers, frozenset({"deceased", "date_of_death"})
    )
    ce_headers = [(k, v) for k, v in headers if k.startswith("ce_") or k == "content-type"]
    tampered = change_one_byte_of(delivered, b"Example-Smith")
    await _produce(services, topics.agency("hmpo"), subject_id, tampered, ce_headers + delivered_headers)
    reason = await _dead_letter_reason(services, event_id, "agency:hmpo")
    assert reason.startswith("signature rejected: deceased is not what the office signed"), reason

    # The same message untampered is applied: the rejection was the signature's doing.
    await _produce(services, topics.agency("hmpo"), subject_id, delivered, ce_headers + delivered_headers)
    outcomes = await eventually(
        lambda: _receipts(services, "hmpo", event_id), timeout=60, what="hmpo's receipt for the genuine copy"
    )
    assert outcomes == ["APPLIED"], "one receipt, for the genuine copy; none for the tampered one"


@given(
    salts=st.dictionaries(
        st.sampled_from(["envelope", "next_of_kin/0.nino", "informant.name"]) | st.text(min_size=1),
        st.text(max_size=24) | st.binary(min_size=16, max_size=16).map(b64encode),
        max_size=8,
    ),
    data=st.data(),
)
def test_the_salts_header_is_canonical_json_of_the_disclosed_salts(
    salts: dict[str, str], data: st.DataObject
) -> None:
    """Written directly when nothing needs escaping, and the general way otherwise: the
    same bytes as ``canonical_json`` either way, for any names and salts."""
    disclose = data.draw(st.sets(st.sampled_from(sorted(salts)) if salts else st.nothing()))
    headers = dict(disclosing(b"sig", b"manifest", salts, disclose))
    assert headers[SALTS_HEADER] == canonical_json({name: salts[name] for name in disclose})
    assert json.loads(headers[SALTS_HEADER]) == {name: salts[name] for name in disclose}
