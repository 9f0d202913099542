"""Data minimisation: cut an event down to the field paths one agency may receive.

The envelope's ids, times, channel and office always travel (they say what
happened and when); its personal fields (the subject's NINO, the informant's
name and relationship, who recorded it) only when granted, like every other
path (see ``schemas.fieldpaths``). Everything not granted becomes null, and the
copy's ``withheld_fields`` lists the paths left out.

What a grant keeps of an event type (``Cut``) is worked out once per grant and
type, not once per event: an agency's grants change rarely, its events often.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas.catalogue import CATALOGUE, DISCLOSURE_SUFFIX
from schemas.codec import HEADER, field_writer
from schemas.fieldpaths import ENVELOPE_PATHS, NINO, SPLIT_TYPE, covered, grantable_paths, split_fields
from schemas.signatures import ENVELOPE, items
from schemas.spans import NotSpliceable, Spans, locate

__all__ = [
    "NINO",
    "Copies",
    "Cut",
    "cut",
    "disclosed",
    "event_fields",
    "minimise",
    "minimise_envelope",
    "splice",
    "valued_items",
]

WITHHELD_FIELDS = "withheld_fields"


def event_fields(event_type: str) -> frozenset[str]:
    """The paths a subscription can grant for this event type."""
    return grantable_paths(event_type)


@dataclass(frozen=True)
class Cut:
    """What one grant keeps of one event type."""

    envelope_withheld: tuple[tuple[str, str], ...]  # (member, its field) of each personal field left out
    whole: frozenset[str]  # top-level fields kept whole
    parts: Mapping[str, tuple[str, ...]]  # a related person's field → the parts kept (none: withheld)
    withheld: list[str]  # the grantable paths left out, sorted

    def keeps(self, name: str, delivered: frozenset[str]) -> bool:
        """Whether a top-level field that is not split into parts is kept."""
        return name in self.whole or (name not in self.parts and covered(name, delivered))


@functools.lru_cache(maxsize=4096)
def cut(event_type: str, delivered: frozenset[str]) -> Cut:
    """What ``delivered`` keeps of an ``event_type``."""
    split = split_fields(event_type)
    names = [f["name"] for f in CATALOGUE.latest(event_type).schema["fields"]]
    grantable = event_fields(event_type)
    return Cut(
        envelope_withheld=_envelope_withheld(delivered),
        whole=frozenset(n for n in names if n not in split and covered(n, delivered)),
        parts={
            name: tuple(part for part in parts if covered(f"{name}.{part}", delivered))
            for name, parts in split.items()
        },
        withheld=sorted(p for p in grantable if not covered(p, delivered)),
    )


@functools.lru_cache(maxsize=4096)
def _envelope_withheld(delivered: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """(member, its field) of each of the envelope's personal fields ``delivered`` leaves out."""
    return tuple(member for path, member in ENVELOPE_PATHS.items() if not covered(path, delivered))


def minimise_envelope(envelope: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    return _envelope(envelope, _envelope_withheld(delivered))


def _envelope(envelope: Mapping[str, Any], withheld: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    minimised = dict(envelope)
    for outer, inner in withheld:
        if isinstance(minimised.get(outer), Mapping):
            minimised[outer] = {**minimised[outer], inner: None}
    return minimised


def minimise(event_type: str, record: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    """The copy of ``record`` (a whole event of ``event_type``) that carries only ``delivered``."""
    kept = cut(event_type, delivered)
    minimised: dict[str, Any] = {"envelope": _envelope(record["envelope"], kept.envelope_withheld)}
    for name, value in record.items():
        if name not in ("envelope", WITHHELD_FIELDS):
            minimised[name] = _field(name, value, kept, delivered)
    minimised[WITHHELD_FIELDS] = list(kept.withheld)
    return minimised


def _field(name: str, value: Any, kept: Cut, delivered: frozenset[str]) -> Any:
    parts = kept.parts.get(name)
    if parts is None:
        return value if kept.keeps(name, delivered) else None
    if not parts or value is None:
        return None
    if isinstance(value, list):
        return [_keep(element, parts) for element in value] if value else None
    return _keep(value, parts)


def _variant(name: str, kept: Cut, delivered: frozenset[str]) -> Hashable:
    """What a field's cut depends on: two grants with the same variant cut it alike."""
    if name == "envelope":
        return kept.envelope_withheld
    if name == WITHHELD_FIELDS:
        return tuple(kept.withheld)
    parts = kept.parts.get(name)
    return parts if parts is not None else kept.keeps(name, delivered)


def _item_field(name: str) -> tuple[str, str | None]:
    """(field, part) of a signed item: ``next_of_kin/0.nino`` → (next_of_kin, nino);
    the envelope's own items → (envelope, None) for its core, (envelope, path) for the rest."""
    if name == ENVELOPE or name in ENVELOPE_PATHS:
        return ENVELOPE, None if name == ENVELOPE else name
    if "." in name:
        field, part = name.split(".", 1)
        return field.split("/", 1)[0], part
    return name, None


def _keep(person: Mapping[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    return {part: (value if part in parts else None) for part, value in person.items()}


class Copies:
    """One life event's copies for the agencies it goes to, minimised and encoded as
    ``encode(<type>Disclosure, minimise(...))`` would, but with each field cut and encoded
    once per distinct cut of it: agencies granted the same parts of a field share its
    bytes, however their grants differ elsewhere. Given the event's own bytes (``value``,
    as ``record`` was decoded from), ``encoded`` splices each copy from them instead."""

    def __init__(self, event_type: str, record: Mapping[str, Any], value: bytes | None = None) -> None:
        self.event_type = event_type
        self.record = record
        self.writer = field_writer(f"{event_type}{DISCLOSURE_SUFFIX}")
        self._cut: dict[tuple[str, Hashable], tuple[Any, bytes]] = {}
        self._valued = valued_items(event_type, record)
        self._bytes = value
        self._spans: Spans | None = None
        if value is not None:
            try:
                self._spans = locate(event_type, value)
            except NotSpliceable:  # an older schema version: cut and encoded instead
                pass

    def encoded(self, delivered: frozenset[str]) -> bytes:
        """The encoding of ``copy(delivered)``: spliced from the event's bytes when they
        were given and could be located, else cut and encoded."""
        if self._spans is not None and self._bytes is not None:
            return splice(self.event_type, self._bytes, self._spans, delivered)
        return self.copy(delivered)[1]

    def disclosed(self, delivered: frozenset[str]) -> set[str]:
        """The signed items ``copy(delivered)`` carries, whose salts it discloses: what
        ``disclosed_items`` of that copy gives, without taking the copy apart again."""
        return set(disclosed(self.event_type, delivered, self._valued))

    def copy(self, delivered: frozenset[str]) -> tuple[dict[str, Any], bytes]:
        """The copy that carries only ``delivered``, and its encoding."""
        kept = cut(self.event_type, delivered)
        values: dict[str, Any] = {}
        chunks: list[bytes] = []
        for name in self.writer.names:
            variant = (name, _variant(name, kept, delivered))
            if variant not in self._cut:
                value = self._value(name, kept, delivered)
                self._cut[variant] = (value, self.writer.field(name, value))
            values[name], encoded = self._cut[variant]
            chunks.append(encoded)
        return values, self.writer.join(chunks)

    def _value(self, name: str, kept: Cut, delivered: frozenset[str]) -> Any:
        if name == "envelope":
            return _envelope(self.record["envelope"], kept.envelope_withheld)
        if name == WITHHELD_FIELDS:
            return list(kept.withheld)
        return _field(name, self.record.get(name), kept, delivered)


def valued_items(event_type: str, record: Mapping[str, Any]) -> tuple[str, ...]:
    """The event's signed items that have a value (a withheld or null item needs no salt)."""
    return tuple(name for name, value in items(event_type, record).items() if value not in (None, []))


@functools.lru_cache(maxsize=4096)
def disclosed(event_type: str, delivered: frozenset[str], valued: tuple[str, ...]) -> frozenset[str]:
    """The signed items a copy carrying ``delivered`` discloses the salts of, given the
    event's ``valued`` items: the envelope, and each valued item the grant keeps (an
    envelope field, a related person's part, or a field)."""
    kept = cut(event_type, delivered)
    found = {ENVELOPE}
    for name in valued:
        field, part = _item_field(name)
        if field == ENVELOPE:
            if ENVELOPE_PATHS.get(name) not in kept.envelope_withheld:
                found.add(name)
        elif part is not None:
            if part in kept.parts.get(field, ()):
                found.add(name)
        elif kept.keeps(field, delivered):
            found.add(name)
    return frozenset(found)


# Splicing a copy from the event's own bytes (see ``schemas.spans``): a part the
# disclosure makes optional gains the union index of its value when kept; a part
# withheld becomes the null branch.
_VALUE, _NULL = b"\x02", b"\x00"


@dataclass(frozen=True)
class _Splice:
    """What one grant does to each located part of one event type: ``None`` keeps the
    bytes as they are, ``_VALUE`` puts a union index before them, ``_NULL`` replaces them."""

    framing: bytes
    fields: tuple[bytes | None, ...]  # per top-level field (the envelope's: None)
    envelope_at: int  # the envelope's place among the fields
    envelope: tuple[bytes | None, ...]  # per personal field of the envelope
    people: Mapping[int, tuple[str, tuple[bytes | None, ...]]]  # field index → (name, per part)
    withheld: bytes  # the copy's withheld_fields, encoded

    @functools.cached_property
    def steps(self) -> tuple[_Step, ...]:
        """The changes in the order of the bytes, leaving out the parts kept as they are
        (``None``): what ``splice`` does for each event, worked out once per grant."""
        steps: list[_Step] = []
        for index, change in enumerate(self.fields):
            if index == self.envelope_at:
                steps += ((_MEMBER, n, c, "", ()) for n, c in enumerate(self.envelope) if c is not None)
            elif index in self.people:
                name, per_part = self.people[index]
                parts = tuple((n, c) for n, c in enumerate(per_part) if c is not None)
                steps.append((_PEOPLE, index, b"" if change is None else change, name, parts))
            elif change is not None:
                steps.append((_FIELD, index, change, "", ()))
        return tuple(steps)


_FIELD, _MEMBER, _PEOPLE = 0, 1, 2
# (kind, index of the field or envelope member, its change (b"": a related person's field
# itself kept as it is), a related person's field name, (part index, change) of each
# person's parts that change)
_Step = tuple[int, int, bytes, str, tuple[tuple[int, bytes], ...]]


@functools.lru_cache(maxsize=64)
def _optional(event_type: str) -> tuple[tuple[bool, ...], tuple[bool, ...], tuple[bool, ...]]:
    """Whether each top-level field, each of the envelope's personal fields and each part
    of a related person is optional already in the event's schema; the disclosure makes
    the others so. Any other union is refused: its branches would shift."""
    entry = CATALOGUE.latest(event_type)
    named = entry.parsed["__named_schemas"]

    def resolve(schema: Any) -> Any:
        return named.get(schema, schema) if isinstance(schema, str) else schema

    def optional(schema: Any) -> bool:
        if isinstance(schema, list):
            if schema[0] != "null":
                raise NotSpliceable(f"{event_type} has a union whose first branch is not null")
            return True
        return False

    fields = entry.parsed["fields"]
    envelope = resolve(next(f["type"] for f in fields if f["name"] == ENVELOPE))
    inner = {
        (outer["name"], f["name"]): f["type"]
        for outer in envelope["fields"]
        if isinstance(resolve(outer["type"]), dict) and resolve(outer["type"]).get("type") == "record"
        for f in resolve(outer["type"])["fields"]
    }
    person = named.get(SPLIT_TYPE)
    return (
        tuple(optional(f["type"]) for f in fields),
        tuple(optional(inner[member]) for member in ENVELOPE_PATHS.values()),
        tuple(optional(f["type"]) for f in person["fields"]) if person else (),
    )


@functools.lru_cache(maxsize=4096)
def _splice(event_type: str, delivered: frozenset[str]) -> _Splice:
    kept = cut(event_type, delivered)
    writer = field_writer(f"{event_type}{DISCLOSURE_SUFFIX}")
    top, envelope, parts = _optional(event_type)
    entry = CATALOGUE.latest(event_type)
    names = [f["name"] for f in entry.parsed["fields"]]
    person = entry.parsed["__named_schemas"].get(SPLIT_TYPE, {"fields": []})
    part_names = [f["name"] for f in person["fields"]]

    def action(keep: bool, optional: bool) -> bytes | None:
        return (None if optional else _VALUE) if keep else _NULL

    fields: list[bytes | None] = []
    people: dict[int, tuple[str, tuple[bytes | None, ...]]] = {}
    for index, name in enumerate(names):
        if name == ENVELOPE:
            fields.append(None)
        elif name in kept.parts:
            kept_parts = kept.parts[name]
            fields.append(action(bool(kept_parts), top[index]))
            if kept_parts:
                people[index] = (
                    name,
                    tuple(action(p in kept_parts, o) for p, o in zip(part_names, parts, strict=True)),
                )
        else:
            fields.append(action(kept.keeps(name, delivered), top[index]))
    return _Splice(
        framing=writer.join(()),
        fields=tuple(fields),
        envelope_at=names.index(ENVELOPE),
        envelope=tuple(
            action(member not in kept.envelope_withheld, optional)
            for member, optional in zip(ENVELOPE_PATHS.values(), envelope, strict=True)
        ),
        people=people,
        withheld=writer.field(WITHHELD_FIELDS, list(kept.withheld)),
    )


def splice(event_type: str, value: bytes, spans: Spans, delivered: frozenset[str]) -> bytes:
    """The copy of ``value`` (an encoded ``event_type`` located as ``spans``) that carries
    only ``delivered``: byte for byte what ``Copies(...).copy(delivered)`` encodes, cut
    from the event's own bytes without decoding them."""
    plan = _splice(event_type, delivered)
    pieces = [plan.framing]
    pos = HEADER.size
    # Each change: the bytes since the last one, then the change; a union index goes before
    # the kept bytes (which follow from ``start``), a null replaces them (up to ``end``).
    fields, members = spans.fields, spans.envelope
    for kind, index, change, name, parts in plan.steps:
        if kind == _FIELD:
            start = fields[2 * index]
            pieces += (value[pos:start], change)
            pos = start if change is _VALUE else fields[2 * index + 1]
        elif kind == _MEMBER:
            start = members[2 * index]
            pieces += (value[pos:start], change)
            pos = start if change is _VALUE else members[2 * index + 1]
        else:
            persons = spans.people[name]
            if not persons:  # null or an empty list, whose byte is the null's already
                continue
            if change:
                start = fields[2 * index]
                pieces += (value[pos:start], change)
                pos = start if change is _VALUE else fields[2 * index + 1]
            for person in persons:
                for n, part_change in parts:
                    start = person[2 * n]
                    pieces += (value[pos:start], part_change)
                    pos = start if part_change is _VALUE else person[2 * n + 1]
    pieces.append(value[pos:])
    pieces.append(plan.withheld)
    return b"".join(pieces)
