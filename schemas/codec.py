"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id,
then the Avro binary body. Any Confluent-compatible deserialiser can read it."""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from schemas.catalogue import CATALOGUE, SchemaCatalogue, UnknownSchema

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class UndecodableMessage(ValueError):
    """A message value is not a Confluent-framed Avro record this catalogue knows."""


def encode(subject: str, record: dict[str, Any], catalogue: SchemaCatalogue = CATALOGUE) -> bytes:
    entry = catalogue.latest(subject)
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(MAGIC_BYTE, entry.schema_id))
    schemaless_writer(buffer, entry.parsed, record)
    return buffer.getvalue()


def decode(value: bytes, catalogue: SchemaCatalogue = CATALOGUE) -> tuple[str, dict[str, Any]]:
    """Return (subject, record). Raises UndecodableMessage with the reason."""
    if len(value) < _HEADER.size:
        raise UndecodableMessage(f"message is {len(value)} bytes, shorter than the wire header")
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != MAGIC_BYTE:
        raise UndecodableMessage(f"magic byte is {magic}, expected {MAGIC_BYTE}")
    try:
        entry = catalogue.by_id(schema_id)
    except UnknownSchema as exc:
        raise UndecodableMessage(str(exc)) from exc
    body = io.BytesIO(value[_HEADER.size :])
    try:
        record = schemaless_reader(body, entry.parsed, entry.parsed)
    except (EOFError, ValueError, IndexError, UnicodeDecodeError, TypeError) as exc:
        raise UndecodableMessage(f"{entry.subject} body does not decode: {exc}") from exc
    if body.read(1):
        raise UndecodableMessage(f"{entry.subject} body has trailing bytes")
    if not isinstance(record, dict):
        raise UndecodableMessage(f"{entry.subject} body is not a record")
    return entry.subject, record
