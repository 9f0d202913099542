"""Field paths: the parts of an event that a subscription can grant, one by one.

Data minimisation, the office's selective-disclosure signature and the agencies'
copies all work on the same parts, so an agency can be given exactly what it
needs and check the office's signature on exactly that:

- the envelope's personal fields, each on its own: ``nino`` (the subject's NINO),
  ``informant.name``, ``informant.relationship`` and ``recorded_by`` (who captured
  it). The rest of the envelope (ids, times, channel, office) always travels;
- every other top-level field by its name (``deceased``, ``last_address``, …);
- except fields holding related people (a partner, next of kin, an executor,
  parents, people moving too), which are granted part by part:
  ``surviving_partner.person``, ``surviving_partner.relationship``,
  ``surviving_partner.nino``, ``surviving_partner.address``. For a list of
  people the path covers that part of every element (``next_of_kin.person``).

A path grants the whole value at it. Paths are derived from the schemas, so a
field added to a schema is grantable at once, and withheld until granted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from schemas.catalogue import CATALOGUE, NAMESPACE

NINO = "nino"
# Grantable path → (envelope member, its field). Everything else in the envelope always travels.
ENVELOPE_PATHS: Mapping[str, tuple[str, str]] = {
    NINO: ("subject", "nino"),
    "informant.name": ("informant", "name"),
    "informant.relationship": ("informant", "relationship"),
    "recorded_by": ("provenance", "recorded_by"),
}
SPLIT_TYPE = f"{NAMESPACE}.RelatedPerson"  # granted part by part


def _named_definitions(schema: Any, found: dict[str, dict[str, Any]]) -> None:
    if isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed") and "name" in schema:
            found.setdefault(schema["name"], schema)
        for field in schema.get("fields", ()):
            _named_definitions(field["type"], found)
        if schema.get("type") == "array":
            _named_definitions(schema["items"], found)
    elif isinstance(schema, list):
        for branch in schema:
            _named_definitions(branch, found)


def _type_name(schema: Any) -> str | None:
    """The named type a field holds, through a nullable union or an array."""
    if isinstance(schema, list):
        named = [_type_name(branch) for branch in schema if branch != "null"]
        return named[0] if len(named) == 1 else None
    if isinstance(schema, dict):
        if schema.get("type") == "array":
            return _type_name(schema["items"])
        return schema.get("name")
    return schema if isinstance(schema, str) and "." in schema else None


@cache
def split_fields(event_type: str) -> Mapping[str, tuple[str, ...]]:
    """Top-level field → its parts, for the fields granted part by part."""
    schema = CATALOGUE.latest(event_type).schema
    definitions: dict[str, dict[str, Any]] = {}
    _named_definitions(schema, definitions)
    split = definitions.get(SPLIT_TYPE)
    if split is None:
        return {}
    parts = tuple(f["name"] for f in split["fields"])
    return {
        field["name"]: parts
        for field in schema["fields"]
        if field["name"] != "envelope" and _type_name(field["type"]) == SPLIT_TYPE
    }


@cache
def grantable_paths(event_type: str) -> frozenset[str]:
    """Every path a subscription to ``event_type`` may name."""
    schema = CATALOGUE.latest(event_type).schema
    split = split_fields(event_type)
    paths = set(ENVELOPE_PATHS)
    for field in schema["fields"]:
        name = field["name"]
        if name == "envelope":
            continue
        paths.update(f"{name}.{part}" for part in split[name]) if name in split else paths.add(name)
    return frozenset(paths)


def covered(path: str, granted: Iterable[str]) -> bool:
    """Whether ``path`` (e.g. a correction's ``surviving_partner.person.family_name``) lies
    within something granted. Also reads grants recorded before paths existed, when a
    whole ``surviving_partner`` was one field."""
    return any(path == g or path.startswith(g + ".") for g in granted)
