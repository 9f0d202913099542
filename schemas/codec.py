"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id,
then the Avro binary body. Any Confluent-compatible deserialiser can read it.

Values are written with the latest version of their schema and read with the
writer's version (found by the id), resolved to the latest version when they differ.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
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


class FieldWriter:
    """Writes records of one schema a top-level field at a time. Avro's binary form of a
    record is its fields' forms one after another, so records that share a field's value
    can share its bytes: ``join`` of each field's ``field`` bytes, in ``names`` order, is
    exactly what ``encode`` writes for the whole record."""

    def __init__(self, name: str, catalogue: SchemaCatalogue | None = None) -> None:
        self.catalogue = catalogue or active()
        entry = self.catalogue.latest(name)
        self._framing = HEADER.pack(MAGIC_BYTE, entry.schema_id)
        named = entry.parsed["__named_schemas"]
        # Each field as a record of that one field: the same bytes as the field alone.
        self._fields = {
            field["name"]: {
                "type": "record",
                "name": f"{entry.name}.{field['name']}",
                "fields": [field],
                "__fastavro_parsed": True,
                "__named_schemas": named,
            }
            for field in entry.parsed["fields"]
        }
        self.names = tuple(self._fields)
        # A field that is a record or null: name its branch, which spares fastavro from
        # validating the whole record against each branch to find which it is.
        self._branch = {
            field["name"]: branch
            for field in entry.parsed["fields"]
            if (branch := _record_or_null(field["type"], named))
        }

    def field(self, name: str, value: Any) -> bytes:
        branch = self._branch.get(name)
        buffer = io.BytesIO()
        schemaless_writer(
            buffer, self._fields[name], {name: value if branch is None or value is None else (branch, value)}
        )
        return buffer.getvalue()

    def join(self, fields: Iterable[bytes]) -> bytes:
        return self._framing + b"".join(fields)


def avro_string(text: str) -> bytes:
    """Avro's binary form of a string: its UTF-8 length as a zig-zag varint, then the bytes."""
    data = text.encode()
    n = len(data) << 1  # zig-zag of a length, never negative
    length = bytearray()
    while n > 0x7F:
        length.append((n & 0x7F) | 0x80)
        n >>= 7
    length.append(n)
    return bytes(length) + data


_FIELD_WRITERS: dict[str, FieldWriter] = {}


def field_writer(name: str) -> FieldWriter:
    """The active catalogue's ``FieldWriter`` for ``name``, made once."""
    catalogue = active()
    writer = _FIELD_WRITERS.get(name)
    if writer is None or writer.catalogue is not catalogue:
        writer = _FIELD_WRITERS[name] = FieldWriter(name, catalogue)
    return writer


def _record_or_null(schema: Any, named: dict[str, Any]) -> str | None:
    """The record's full name, if ``schema`` is a union of null and one record."""
    if not isinstance(schema, list) or len(schema) != 2 or "null" not in schema:
        return None
    other = schema[1] if schema[0] == "null" else schema[0]
    if isinstance(other, str):
        other = named.get(other)
    return other["name"] if isinstance(other, dict) and other.get("type") == "record" else None


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
