"""The Avro codec: Confluent wire framing, and clear refusals of anything else."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest

from schemas import CATALOGUE, UndecodableMessage, UnknownSchema, decode, encode


def _death() -> dict[str, object]:
    return {
        "envelope": {
            "event_id": str(uuid.uuid4()),
            "reference": "TUO-2026-ABCD-EFGH",
            "occurred_at": datetime(2026, 11, 1, tzinfo=UTC),
            "recorded_at": datetime(2026, 11, 2, 9, 30, tzinfo=UTC),
            "subject": {"subject_id": "n-abc", "nino": "AB123456C"},
            "informant": {"name": "Alex", "relationship": "son"},
            "channel": "DESK",
            "registration_office": "Leeds",
            "provenance": {"source_system": "test", "recorded_by": "registrar-1"},
        },
        "deceased": {"given_names": "Pat", "family_name": "Example", "date_of_birth": date(1941, 3, 2)},
        "date_of_death": date(2026, 11, 1),
        "place_of_death": "Leeds",
        "last_address": {"lines": ["1 Street"], "town": "Leeds", "postcode": "LS1 1AA", "uprn": None},
    }


def test_every_catalogued_subject_has_a_distinct_wire_id() -> None:
    ids = [CATALOGUE.latest(s).schema_id for s in CATALOGUE.names()]
    assert len(ids) == len(set(ids))
    assert {"BirthRegistered", "DeathRegistered", "AddressChanged"} <= set(CATALOGUE.names())


def test_encoded_death_starts_with_magic_byte_and_schema_id_and_round_trips() -> None:
    record = _death()
    value = encode("DeathRegistered", record)
    assert value[0] == 0
    assert int.from_bytes(value[1:5], "big") == CATALOGUE.latest("DeathRegistered").schema_id
    subject, decoded = decode(value)
    assert subject == "DeathRegistered"
    assert decoded["deceased"] == record["deceased"]
    assert str(decoded["envelope"]["event_id"]) == record["envelope"]["event_id"]  # type: ignore[index]


def test_unknown_enum_symbol_is_refused_when_encoding() -> None:
    record = _death()
    record["envelope"]["channel"] = "CARRIER_PIGEON"  # type: ignore[index]
    with pytest.raises(ValueError, match="CARRIER_PIGEON"):
        encode("DeathRegistered", record)


def test_unknown_subject_is_refused_by_name() -> None:
    with pytest.raises(UnknownSchema, match="MarriageRegistered"):
        encode("MarriageRegistered", {})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "shorter than the wire header"),
        (b"\x00\x00", "shorter than the wire header"),
        (b"\x01\x00\x00\x00\x02rest", "magic byte is 1"),
        (b"\x00\x00\x00\x03\xe7body", "no schema with id 999"),
        (b'{"json": "not avro"}', "magic byte is 123"),
    ],
)
def test_undecodable_values_are_refused_with_the_reason(value: bytes, reason: str) -> None:
    with pytest.raises(UndecodableMessage, match=reason):
        decode(value)


def test_truncated_and_padded_bodies_are_refused() -> None:
    value = encode("DeathRegistered", _death())
    with pytest.raises(UndecodableMessage, match="does not decode"):
        decode(value[:-10])
    with pytest.raises(UndecodableMessage, match="trailing bytes"):
        decode(value + b"\x00\x01")


def test_out_of_range_logical_values_are_undecodable_not_a_crash() -> None:
    """A date beyond the calendar (fastavro raises OverflowError) must become a dead letter."""
    import io
    import json

    from fastavro import parse_schema, schemaless_writer

    entry = CATALOGUE.latest("DeathRegistered")
    plain = json.loads(entry.schema_json)
    plain["fields"][2]["type"] = "int"  # date_of_death without its logical type
    record = _death()
    record["date_of_death"] = 2**31 - 1
    buffer = io.BytesIO()
    buffer.write(b"\x00" + entry.schema_id.to_bytes(4, "big"))
    schemaless_writer(buffer, parse_schema(plain), record)
    with pytest.raises(UndecodableMessage, match="does not decode"):
        decode(buffer.getvalue())
