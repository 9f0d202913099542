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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.catalogue import CATALOGUE
from schemas.fieldpaths import ENVELOPE_PATHS, NINO, covered, grantable_paths, split_fields

__all__ = ["NINO", "Cut", "cut", "event_fields", "minimise", "minimise_envelope"]

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
    """What ``delivered`` keeps of an ``event_type`` (one that is not a life event has no
    related persons and no grantable paths: only its envelope's core and what is named)."""
    try:
        split = split_fields(event_type)
        names = [f["name"] for f in CATALOGUE.latest(event_type).schema["fields"]]
        grantable: frozenset[str] = event_fields(event_type)
    except LookupError:
        split, names, grantable = {}, [], frozenset()
    return Cut(
        envelope_withheld=tuple(
            member for path, member in ENVELOPE_PATHS.items() if not covered(path, delivered)
        ),
        whole=frozenset(n for n in names if n not in split and covered(n, delivered)),
        parts={
            name: tuple(part for part in parts if covered(f"{name}.{part}", delivered))
            for name, parts in split.items()
        },
        withheld=sorted(p for p in grantable if not covered(p, delivered)),
    )


def minimise_envelope(envelope: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    return _envelope(envelope, cut("", delivered))


def _envelope(envelope: Mapping[str, Any], kept: Cut) -> dict[str, Any]:
    minimised = dict(envelope)
    for outer, inner in kept.envelope_withheld:
        if isinstance(minimised.get(outer), Mapping):
            minimised[outer] = {**minimised[outer], inner: None}
    return minimised


def minimise(event_type: str, record: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    """The copy of ``record`` (a whole event of ``event_type``) that carries only ``delivered``."""
    kept = cut(event_type, delivered)
    minimised: dict[str, Any] = {"envelope": _envelope(record["envelope"], kept)}
    for name, value in record.items():
        if name in ("envelope", WITHHELD_FIELDS):
            continue
        parts = kept.parts.get(name)
        if parts is None:
            minimised[name] = value if kept.keeps(name, delivered) else None
        elif not parts or value is None:
            minimised[name] = None
        elif isinstance(value, list):
            minimised[name] = [_keep(element, parts) for element in value] if value else None
        else:
            minimised[name] = _keep(value, parts)
    minimised[WITHHELD_FIELDS] = list(kept.withheld)
    return minimised


def _keep(person: Mapping[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    return {part: (value if part in parts else None) for part, value in person.items()}
