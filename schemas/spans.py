"""Where the parts an agency may be denied lie in a life event's encoded bytes.

A disclosure (``<type>Disclosure``, see ``schemas.catalogue``) is the event's own
Avro encoding with four kinds of change: its framing names the disclosure schema;
a union index ``1`` stands before each part the disclosure makes optional; a
single null byte stands where a part is withheld; and ``withheld_fields`` follows
the last field. So an agency's copy can be spliced from the event's stored bytes,
given where those parts lie. ``locate`` finds them once, when the event is
recorded, by walking its bytes with its schema; ``router.minimise.splice`` cuts
copies from them.

The parts located are exactly what minimisation can withhold (``schemas.fieldpaths``):
each top-level field, the envelope's personal fields, and each part of every
related person.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from schemas.catalogue import active
from schemas.codec import HEADER, schema_id_of
from schemas.fieldpaths import ENVELOPE_PATHS, split_fields

Span = tuple[int, int]  # [start, end) in the framed value


class NotSpliceable(ValueError):
    """These bytes cannot be located against their type's latest schema (an older
    schema version, or a shape splicing does not handle); copies of the event are
    made by decoding and encoding it instead."""


@dataclass(frozen=True)
class Spans:
    """Where each withholdable part of one encoded event lies, as flat runs of offsets
    (start, end, start, end, …): read back from storage as they are, with no pairing up."""

    schema_id: int  # the schema the bytes were written with (the type's latest, when located)
    fields: Sequence[int]  # each top-level field, in the schema's order
    envelope: Sequence[int]  # each of the envelope's personal fields, in ``ENVELOPE_PATHS`` order
    people: Mapping[str, Sequence[Sequence[int]]]  # related-person field → per person: each part

    def as_json(self) -> list[Any]:
        return [
            self.schema_id,
            list(self.fields),
            list(self.envelope),
            {k: list(v) for k, v in self.people.items()},
        ]

    @classmethod
    def from_json(cls, data: list[Any]) -> Spans:
        schema_id, fields, envelope, people = data
        return cls(schema_id, fields, envelope, people)


def _flat(spans: Iterable[Span]) -> list[int]:
    return [n for span in spans for n in span]


def locate(event_type: str, value: bytes) -> Spans:
    """The spans of ``value``, an encoded ``event_type`` written with its latest schema."""
    entry = active().latest(event_type)
    if schema_id_of(value) != entry.schema_id:
        raise NotSpliceable(f"written with schema {schema_id_of(value)}, not {event_type}'s latest")
    walker = _Walker(value, entry.parsed["__named_schemas"])
    split = split_fields(event_type)
    members = {member: path for path, member in ENVELOPE_PATHS.items()}
    fields: list[Span] = []
    envelope: dict[str, Span] = {}
    people: dict[str, tuple[tuple[Span, ...], ...]] = {}
    pos = HEADER.size
    try:
        for field in entry.parsed["fields"]:
            start, kind = pos, field["type"]
            if field["name"] == "envelope":
                pos = walker.record(
                    kind, pos, lambda outer, sub, at: walker.members(outer, sub, at, members, envelope)
                )
            elif field["name"] in split:
                pos, people[field["name"]] = walker.people(kind, pos)
            else:
                pos = walker.skip(kind, pos)
            fields.append((start, pos))
    except IndexError:
        raise NotSpliceable(f"the {event_type} ends early") from None
    if pos != len(value):
        raise NotSpliceable(f"the {event_type} has {len(value) - pos} bytes after its last field")
    if len(envelope) != len(ENVELOPE_PATHS):
        raise NotSpliceable(f"the {event_type}'s envelope lacks a personal field")
    return Spans(
        entry.schema_id,
        _flat(fields),
        _flat(envelope[path] for path in ENVELOPE_PATHS),
        {name: [_flat(person) for person in group] for name, group in people.items()},
    )


class _Walker:
    """Reads past Avro values in ``data`` without decoding them."""

    _FIXED: ClassVar[dict[str, int]] = {"null": 0, "boolean": 1, "float": 4, "double": 8}

    def __init__(self, data: bytes, named: dict[str, Any]) -> None:
        self.data = data
        self.named = named

    def long(self, pos: int) -> tuple[int, int]:
        byte = self.data[pos]
        n, shift, pos = byte & 0x7F, 7, pos + 1
        while byte & 0x80:
            byte = self.data[pos]
            n |= (byte & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
        return (n >> 1) ^ -(n & 1), pos

    def resolve(self, schema: Any) -> Any:
        return self.named[schema] if isinstance(schema, str) and schema in self.named else schema

    def skip(self, schema: Any, pos: int) -> int:
        schema = self.resolve(schema)
        if isinstance(schema, str):
            if schema in self._FIXED:
                return pos + self._FIXED[schema]
            if schema in ("int", "long"):
                return self.long(pos)[1]
            if schema in ("string", "bytes"):
                size, pos = self.long(pos)
                return pos + size
            raise NotSpliceable(f"unknown Avro type {schema!r}")
        if isinstance(schema, list):
            index, pos = self.long(pos)
            return self.skip(schema[index], pos)
        kind = schema["type"]
        if kind == "record":
            for field in schema["fields"]:
                pos = self.skip(field["type"], pos)
            return pos
        if kind == "enum":
            return self.long(pos)[1]
        if kind == "fixed":
            return pos + int(schema["size"])
        if kind in ("array", "map"):
            while True:
                count, pos = self.long(pos)
                if count == 0:
                    return pos
                if count < 0:  # a block that gives its size in bytes
                    size, pos = self.long(pos)
                    pos += size
                    continue
                for _ in range(count):
                    if kind == "map":
                        pos = self.skip("string", pos)
                    pos = self.skip(schema["items"] if kind == "array" else schema["values"], pos)
        return self.skip(kind, pos)  # a primitive with a logical type

    def record(self, schema: Any, pos: int, each: Any) -> int:
        """Walk a record, giving ``each(field name, field type, position)`` every field to
        read past; it returns where the field ends."""
        schema = self.resolve(schema)
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise NotSpliceable("expected a record")
        for field in schema["fields"]:
            pos = each(field["name"], field["type"], pos)
        return pos

    def members(
        self, outer: str, schema: Any, pos: int, wanted: dict[tuple[str, str], str], found: dict[str, Span]
    ) -> int:
        """An envelope member: the span of each of its fields that is a personal field."""
        if not any(member[0] == outer for member in wanted):
            return self.skip(schema, pos)

        def inner(name: str, kind: Any, at: int) -> int:
            end = self.skip(kind, at)
            if (outer, name) in wanted:
                found[wanted[outer, name]] = (at, end)
            return end

        return self.record(schema, pos, inner)

    def person(self, schema: Any, pos: int) -> tuple[int, tuple[Span, ...]]:
        parts: list[Span] = []

        def part(_: str, kind: Any, at: int) -> int:
            end = self.skip(kind, at)
            parts.append((at, end))
            return end

        return self.record(schema, pos, part), tuple(parts)

    def people(self, schema: Any, pos: int) -> tuple[int, tuple[tuple[Span, ...], ...]]:
        """A related-person field: a person or null, or a list of people."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            if schema[0] != "null" or len(schema) != 2:
                raise NotSpliceable("a related person that is not a person or null")
            index, pos = self.long(pos)
            if index == 0:
                return pos, ()
            pos, parts = self.person(schema[1], pos)
            return pos, (parts,)
        if not isinstance(schema, dict) or schema.get("type") != "array":
            raise NotSpliceable("a related-person field that is neither optional nor a list")
        found: list[tuple[Span, ...]] = []
        while True:
            count, pos = self.long(pos)
            if count == 0:
                return pos, tuple(found)
            if count < 0:
                raise NotSpliceable("a list of people written in sized blocks")
            for _ in range(count):
                pos, parts = self.person(schema["items"], pos)
                found.append(parts)
