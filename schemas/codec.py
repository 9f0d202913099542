"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id,
then the Avro binary body. Any Confluent-compatible deserialiser can read it.

Values are written with the latest version of their schema and read with the
writer's version (found by the id), resolved to the latest version when they differ.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from schemas.catalogue import SchemaCatalogue, UnknownSchema, active

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")


class UndecodableMessage(ValueError):
    """A message value is not a Confluent-framed Avro record this catalogue knows."""


def encode(name: str, record: dict[str, Any], catalogue: SchemaCatalogue | None = None) -> bytes:
    entry = (catalogue or active()).latest(name)
    buffer = io.BytesIO()
    buffer.write(HEADER.pack(MAGIC_BYTE, entry.schema_id))
    schemaless_writer(buffer, entry.parsed, record)
    return buffer.getvalue()


def schema_id_of(value: bytes) -> int:
    if len(value) < HEADER.size:
        raise UndecodableMessage(f"message is {len(value)} bytes, shorter than the wire header")
    magic, schema_id = HEADER.unpack_from(value)
    if magic != MAGIC_BYTE:
        raise UndecodableMessage(f"magic byte is {magic}, expected {MAGIC_BYTE}")
    return int(schema_id)


def decode(value: bytes, catalogue: SchemaCatalogue | None = None) -> tuple[str, dict[str, Any]]:
    """Return (schema name, record). Raises UndecodableMessage with the reason."""
    catalogue = catalogue or active()
    schema_id = schema_id_of(value)
    try:
        writer = catalogue.by_id(schema_id)
    except UnknownSchema as exc:
        raise UndecodableMessage(str(exc)) from exc
    reader = catalogue.latest(writer.name)
    body = io.BytesIO(value)
    body.seek(HEADER.size)
    try:
        record = schemaless_reader(body, writer.parsed, None if reader is writer else reader.parsed)
    except Exception as exc:
        raise UndecodableMessage(f"{writer.name} body does not decode: {type(exc).__name__}: {exc}") from exc
    if body.read(1):
        raise UndecodableMessage(f"{writer.name} body has trailing bytes")
    if not isinstance(record, dict):
        raise UndecodableMessage(f"{writer.name} body is not a record")
    return writer.name, record
