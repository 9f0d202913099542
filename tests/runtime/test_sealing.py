"""Outbox payloads are sealed at rest (AES-256-GCM) and still reach the agencies."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from operators.web import create_app
from producers.relay import OutboxRelay
from runtime.sealing import CannotOpen, PayloadSealer, new_data_key
from runtime.settings import MissingSetting, Settings
from schemas import decode
from tests.support import death_registration, eventually, header, read_topic

EVENT = uuid.uuid4()
AVRO = b"\x00\x00\x00\x00\x07" + b"Jane Example AB123456C LS1 4AB 1950-01-02"


def test_a_sealed_payload_opens_with_its_key_and_event_id() -> None:
    sealer = PayloadSealer(new_data_key())
    sealed = sealer.seal(AVRO, EVENT)
    assert sealed[:1] == b"\x01" and b"Example" not in sealed and b"AB123456C" not in sealed
    assert sealer.open(sealed, EVENT) == AVRO
    assert sealer.seal(AVRO, EVENT) != sealed, "a fresh nonce each time"


def test_a_payload_altered_by_one_byte_does_not_open() -> None:
    sealer = PayloadSealer(new_data_key())
    sealed = bytearray(sealer.seal(AVRO, EVENT))
    sealed[-5] ^= 0x01
    with pytest.raises(CannotOpen, match="altered or moved"):
        sealer.open(bytes(sealed), EVENT)


def test_a_payload_moved_to_another_event_does_not_open() -> None:
    sealer = PayloadSealer(new_data_key())
    with pytest.raises(CannotOpen, match="altered or moved"):
        sealer.open(sealer.seal(AVRO, EVENT), uuid.uuid4())


def test_after_rotation_old_payloads_open_with_the_previous_key_and_new_ones_use_the_new_key() -> None:
    old, new = new_data_key(), new_data_key()
    sealed_before = PayloadSealer(old).seal(AVRO, EVENT)
    rotated = PayloadSealer(new, [old])
    assert rotated.open(sealed_before, EVENT) == AVRO
    assert PayloadSealer(new).open(rotated.seal(AVRO, EVENT), EVENT) == AVRO
    with pytest.raises(CannotOpen, match="TUO_DATA_KEYS_PREVIOUS"):
        PayloadSealer(new).open(sealed_before, EVENT)


def test_a_payload_that_is_not_sealed_is_refused() -> None:
    with pytest.raises(CannotOpen, match="not sealed"):
        PayloadSealer(new_data_key()).open(AVRO, EVENT)


@pytest.mark.parametrize(
    "key", ["", "short", "!" * 44, new_data_key()[:-4]], ids=["empty", "short", "not base64", "truncated"]
)
def test_a_malformed_data_key_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="32 random bytes"):
        PayloadSealer(key)


def test_without_a_data_key_intake_and_relay_refuse_to_start() -> None:
    settings = Settings(data_key=None)
    with pytest.raises(MissingSetting, match="TUO_DATA_KEY"):
        create_app(settings)
    with pytest.raises(MissingSetting, match="TUO_DATA_KEY"):
        OutboxRelay(settings, None)


@pytest.mark.integration
async def test_the_outbox_holds_no_personal_data_in_clear_yet_agencies_get_the_event(
    services: Settings, pool: asyncpg.Pool, intake: httpx.AsyncClient
) -> None:
    registration = death_registration()
    accepted = (await intake.post("/v1/death-registrations", json=registration)).json()
    stored = bytes(
        await pool.fetchval(
            "SELECT message_value FROM outbox WHERE event_id = $1", uuid.UUID(accepted["event_id"])
        )
    )
    deceased = registration["deceased"]
    clear = [
        deceased["family_name"],
        deceased["given_names"],
        registration["last_address"]["lines"][0],
        deceased["nino"].replace(" ", ""),
        deceased["date_of_birth"],
        registration["last_address"]["postcode"],
    ]
    assert stored[:1] == b"\x01"
    opened = PayloadSealer.from_settings(services).open(stored, uuid.UUID(accepted["event_id"]))
    assert deceased["family_name"].encode() in opened, "the check below would see a name in clear"
    for value in clear:
        assert value.encode() not in stored, f"{value!r} is in the outbox in clear"

    async def delivered() -> bytes | None:
        records = await read_topic(services, f"{services.topic_prefix}.agency.dwp")
        found = [r for r in records if header(r, "ce_id") == accepted["event_id"]]
        return found[0].value if found else None

    value = await eventually(delivered, what="the event at dwp")
    _, body = decode(value or b"")
    assert body["deceased"]["family_name"] == deceased["family_name"], "the agency gets the clear event"
