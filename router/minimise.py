"""Data minimisation: cut an event down to the field paths one agency may receive.

The envelope's ids, times, channel and office always travel (they say what
happened and when); its personal fields (the subject's NINO, the informant's
name and relationship, who recorded it) only when granted, like every other
path (see ``schemas.fieldpaths``). Everything not granted becomes null, and the
copy's ``withheld_fields`` lists the paths left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.fieldpaths import ENVELOPE_PATHS, NINO, covered, grantable_paths, split_fields

__all__ = ["NINO", "event_fields", "minimise", "minimise_envelope"]

WITHHELD_FIELDS = "withheld_fields"


def event_fields(event_type: str) -> frozenset[str]:
    """The paths a subscription can grant for this event type."""
    return grantable_paths(event_type)


def minimise_envelope(envelope: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    minimised = dict(envelope)
    for path, (outer, inner) in ENVELOPE_PATHS.items():
        if not covered(path, delivered) and isinstance(minimised.get(outer), Mapping):
            minimised[outer] = {**minimised[outer], inner: None}
    return minimised


def minimise(event_type: str, record: Mapping[str, Any], delivered: frozenset[str]) -> dict[str, Any]:
    """The copy of ``record`` (a whole event of ``event_type``) that carries only ``delivered``."""
    split = split_fields(event_type)
    minimised: dict[str, Any] = {"envelope": minimise_envelope(record["envelope"], delivered)}
    for name, value in record.items():
        if name in ("envelope", WITHHELD_FIELDS):
            continue
        if name not in split:
            minimised[name] = value if covered(name, delivered) else None
            continue
        parts = [part for part in split[name] if covered(f"{name}.{part}", delivered)]
        if not parts or value is None:
            minimised[name] = None
        elif isinstance(value, list):
            minimised[name] = [_keep(element, parts) for element in value] if value else None
        else:
            minimised[name] = _keep(value, parts)
    minimised[WITHHELD_FIELDS] = sorted(p for p in event_fields(event_type) if not covered(p, delivered))
    return minimised


def _keep(person: Mapping[str, Any], parts: list[str]) -> dict[str, Any]:
    return {part: (value if part in parts else None) for part, value in person.items()}
