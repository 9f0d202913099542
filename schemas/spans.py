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

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.catalogue import SchemaCatalogue, active
from schemas.codec import HEADER, schema_id_of
from schemas.fieldpaths import ENVELOPE_PATHS, split_fields


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


def locate(event_type: str, value: bytes) -> Spans:
    """The spans of ``value``, an encoded ``event_type`` written with its latest schema."""
    layout = _layout(event_type)
    if schema_id_of(value) != layout.schema_id:
        raise NotSpliceable(f"written with schema {schema_id_of(value)}, not {event_type}'s latest")
    fields: list[int] = []
    envelope = [0] * (2 * len(ENVELOPE_PATHS))
    people: dict[str, list[list[int]]] = {}
    pos = HEADER.size
    try:
        for field in layout.fields:
            fields.append(pos)
            if field.envelope is not None:
                for step, slot in field.envelope:
                    end = step(value, pos)
                    if slot >= 0:
                        envelope[2 * slot], envelope[2 * slot + 1] = pos, end
                    pos = end
            elif field.person is not None:
                pos, people[field.name] = _people(value, pos, field.person, many=field.many)
            else:
                pos = field.skip(value, pos)
            fields.append(pos)
    except IndexError:
        raise NotSpliceable(f"the {event_type} ends early") from None
    if pos > len(value):  # a string, bytes or fixed value at the end that is cut short
        raise NotSpliceable(f"the {event_type} ends early")
    if pos != len(value):
        raise NotSpliceable(f"the {event_type} has {len(value) - pos} bytes after its last field")
    return Spans(layout.schema_id, fields, envelope, people)


Skip = Callable[[bytes, int], int]  # reads past one value at a position; where it ends


@dataclass(frozen=True)
class _Field:
    """How to walk one top-level field: the envelope by its steps, a related-person field
    by each person's parts, any other by its skip."""

    name: str
    skip: Skip
    # The envelope's steps read past each member, or each field of a member holding a
    # personal field, with that field's place in ENVELOPE_PATHS (-1: not one).
    envelope: tuple[tuple[Skip, int], ...] | None = None
    person: tuple[Skip, ...] | None = None  # a related person's parts
    many: bool = False  # a list of people, rather than one or null


@dataclass(frozen=True)
class _Layout:
    """How to walk one event type's bytes, worked out once from its latest schema."""

    schema_id: int
    fields: tuple[_Field, ...]


def _layout(event_type: str) -> _Layout:
    return _layout_in(active(), event_type)


@functools.cache
def _layout_in(catalogue: SchemaCatalogue, event_type: str) -> _Layout:
    entry = catalogue.latest(event_type)
    named: dict[str, Any] = entry.parsed["__named_schemas"]
    split = split_fields(event_type)
    slots = {member: n for n, member in enumerate(ENVELOPE_PATHS.values())}

    def resolve(schema: Any) -> Any:
        return named.get(schema, schema) if isinstance(schema, str) else schema

    def record(schema: Any) -> dict[str, Any]:
        schema = resolve(schema)
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise NotSpliceable(f"{event_type}: expected a record")
        return schema

    fields: list[_Field] = []
    for field in entry.parsed["fields"]:
        name, kind = field["name"], field["type"]
        if name == "envelope":
            steps: list[tuple[Skip, int]] = []
            for member in record(kind)["fields"]:
                if any(outer == member["name"] for outer, _ in slots):
                    for inner in record(member["type"])["fields"]:
                        steps.append(
                            (_skipper(inner["type"], named), slots.get((member["name"], inner["name"]), -1))
                        )
                else:
                    steps.append((_skipper(member["type"], named), -1))
            if sorted(slot for _, slot in steps if slot >= 0) != list(range(len(slots))):
                raise NotSpliceable(f"{event_type}'s envelope lacks a personal field")
            fields.append(_Field(name, _skipper(kind, named), envelope=tuple(steps)))
        elif name in split:
            kind = resolve(kind)
            if isinstance(kind, list) and len(kind) == 2 and kind[0] == "null":
                person, many = kind[1], False
            elif isinstance(kind, dict) and kind.get("type") == "array":
                person, many = kind["items"], True
            else:
                raise NotSpliceable(f"{event_type}.{name} is neither a person or null nor a list of people")
            parts = tuple(_skipper(part["type"], named) for part in record(person)["fields"])
            fields.append(_Field(name, _skipper(kind, named), person=parts, many=many))
        else:
            fields.append(_Field(name, _skipper(kind, named)))
    return _Layout(entry.schema_id, tuple(fields))


def _long(data: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint: its value, and where it ends."""
    byte = data[pos]
    n, shift, pos = byte & 0x7F, 7, pos + 1
    while byte & 0x80:
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
    return (n >> 1) ^ -(n & 1), pos


def _skip_long(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def _skip_bytes(data: bytes, pos: int) -> int:
    size, pos = _long(data, pos)
    return pos + size


def _fixed(size: int) -> Skip:
    return lambda data, pos: pos + size


_PRIMITIVE: dict[str, Skip] = {
    "null": _fixed(0),
    "boolean": _fixed(1),
    "float": _fixed(4),
    "double": _fixed(8),
    "int": _skip_long,
    "long": _skip_long,
    "string": _skip_bytes,
    "bytes": _skip_bytes,
}


def _skipper(schema: Any, named: dict[str, Any]) -> Skip:
    """A function that reads past a value of ``schema`` (a fastavro parsed schema)."""
    if isinstance(schema, str):
        if schema in _PRIMITIVE:
            return _PRIMITIVE[schema]
        if schema not in named:
            raise NotSpliceable(f"unknown Avro type {schema!r}")
        return _skipper(named[schema], named)  # no type of ours holds itself
    if isinstance(schema, list):
        branches = tuple(_skipper(branch, named) for branch in schema)

        def union(data: bytes, pos: int) -> int:
            index, pos = _long(data, pos)
            return branches[index](data, pos)

        return union
    kind = schema["type"]
    if kind == "record":
        members = tuple(_skipper(field["type"], named) for field in schema["fields"])

        def record(data: bytes, pos: int) -> int:
            for member in members:
                pos = member(data, pos)
            return pos

        return record
    if kind == "enum":
        return _skip_long
    if kind == "fixed":
        return _fixed(int(schema["size"]))
    if kind in ("array", "map"):
        item = _skipper(schema["items"] if kind == "array" else schema["values"], named)
        key = _skip_bytes if kind == "map" else _PRIMITIVE["null"]

        def blocks(data: bytes, pos: int) -> int:
            while True:
                count, pos = _long(data, pos)
                if count == 0:
                    return pos
                if count < 0:  # a block that gives its size in bytes
                    size, pos = _long(data, pos)
                    pos += size
                    continue
                for _ in range(count):
                    pos = item(data, key(data, pos))

        return blocks
    return _skipper(kind, named)  # a primitive with a logical type


def _people(data: bytes, pos: int, parts: tuple[Skip, ...], *, many: bool) -> tuple[int, list[list[int]]]:
    """A related-person field: one person or null, or a list of people; each person's parts."""
    found: list[list[int]] = []

    def person(pos: int) -> int:
        spans = []
        for part in parts:
            spans.append(pos)
            pos = part(data, pos)
            spans.append(pos)
        found.append(spans)
        return pos

    if not many:
        index, pos = _long(data, pos)
        return (person(pos) if index == 1 else pos), found
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return pos, found
        if count < 0:
            raise NotSpliceable("a list of people written in sized blocks")
        for _ in range(count):
            pos = person(pos)
